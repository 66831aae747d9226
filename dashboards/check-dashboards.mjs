// Type-checks Grafana dashboard JSON against the Dashboard type of
// @grafana/schema: each file becomes a typed TypeScript literal in .check/
// (not committed), then tsc checks them all. Exit code is tsc's.
// Usage: node check-dashboards.mjs [file.json ...]  (default: every dashboard here)
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, ".check");
const skip = new Set(["package.json", "package-lock.json", "tsconfig.json"]);
const given = process.argv.slice(2);
const dashboards =
  given.length > 0
    ? given.map((path) => resolve(path))
    : readdirSync(here)
        .filter((name) => name.endsWith(".json") && !skip.has(name))
        .map((name) => join(here, name));
if (dashboards.length === 0) {
  console.error("no dashboard JSON found");
  process.exit(1);
}
rmSync(out, { recursive: true, force: true });
mkdirSync(out);
dashboards.forEach((path, index) => {
  const body = readFileSync(path, "utf8");
  JSON.parse(body); // fail early, with the JSON parser's message, on broken JSON
  const file = join(out, `${index}-${basename(path).replace(/\.json$/, "")}.ts`);
  writeFileSync(
    file,
    `// Generated from ${path} by check-dashboards.mjs.\n` +
      `import type { Dashboard } from "@grafana/schema";\n` +
      `import type { Json } from "../json-types.js";\n\n` +
      `export const dashboard: Json<Dashboard> = ${body.trim()};\n`,
  );
});
const tsc = join(here, "node_modules", ".bin", "tsc");
try {
  execFileSync(tsc, ["-p", join(here, "tsconfig.json")], { stdio: "inherit" });
  const names = dashboards.map((path) => basename(path)).join(", ");
  console.log(`type-checked ${names} against @grafana/schema Dashboard`);
} catch (error) {
  process.exit(error.status ?? 1);
}
