// One deployment: its events newest first, "load older" paging, and live events.
"use strict";

(() => {
  const match = /^\/deployments\/(\d+)\/?$/.exec(location.pathname);
  const id = match ? Number(match[1]) : 0;
  const tbody = document.querySelector("#events tbody");
  const empty = document.getElementById("empty");
  const olderButton = document.getElementById("older");
  const summary = document.getElementById("summary");
  const title = document.getElementById("title");
  const shown = new Map(); // cursor -> row
  let newest = null; // cursor of the newest row
  let older = null; // cursor to page back from, null when the oldest event is shown
  let count = 0; // events the deployment holds, as far as we know
  let stream = null;

  title.textContent = "Deployment " + id;
  document.title = "Deployment " + id + " · Activity events";

  function showCounts() {
    empty.hidden = shown.size > 0;
    summary.textContent = count ? count + (count === 1 ? " event" : " events") + "; showing " + shown.size + "." : "";
    olderButton.hidden = older === null;
  }

  function makeRow(event) {
    const row = document.createElement("tr");
    row.dataset.cursor = event.cursor;
    Activity.cell(row, "Time", Activity.timeElement(event.receive));
    Activity.cell(row, "Event", String(event.id), "num");
    Activity.cell(row, "Message", event.message, "message");
    return row;
  }

  // Inserts in cursor order (newest first); a cursor already shown is never added twice.
  function insert(event, fresh) {
    if (shown.has(event.cursor)) return false;
    const row = makeRow(event);
    let before = null;
    for (const existing of tbody.children) {
      if (Activity.compareCursors(existing.dataset.cursor, event.cursor) < 0) {
        before = existing;
        break;
      }
    }
    tbody.insertBefore(row, before);
    shown.set(event.cursor, row);
    if (newest === null || Activity.compareCursors(event.cursor, newest) > 0) newest = event.cursor;
    if (fresh) row.classList.add("fresh");
    return true;
  }

  async function loadNewest() {
    shown.clear();
    tbody.replaceChildren();
    newest = null;
    const [page, info] = await Promise.all([
      Activity.api("/api/deployments/" + id + "/events?limit=50"),
      Activity.api("/api/deployments/" + id).catch((error) => {
        if (error.status === 404) return { event_count: 0 };
        throw error;
      }),
    ]);
    count = info.event_count;
    page.events.forEach((event) => insert(event, false));
    older = page.older;
    showCounts();
  }

  async function loadOlder() {
    if (older === null) return;
    olderButton.disabled = true;
    try {
      const page = await Activity.api("/api/deployments/" + id + "/events?limit=50&before=" + encodeURIComponent(older));
      page.events.forEach((event) => insert(event, false));
      older = page.older;
      showCounts();
      if (older === null && document.activeElement === olderButton) {
        // The button hides once the oldest event is shown; keep keyboard focus on the page.
        summary.tabIndex = -1;
        summary.focus();
      }
    } catch (error) {
      Activity.setStatus("Could not load older events: " + error.message, "error");
    } finally {
      olderButton.disabled = false;
    }
  }

  function live(event) {
    if (insert(event, true)) count += 1;
    showCounts();
  }

  async function reset() {
    // Too far behind (or events trimmed by retention): start again from the newest page.
    stream.stop();
    Activity.setStatus("Reloading…", "connecting");
    try {
      await Activity.withSignIn(loadNewest);
    } finally {
      stream.restart();
    }
  }

  olderButton.addEventListener("click", loadOlder);

  Activity.withSignIn(loadNewest)
    .then(() => {
      stream = Activity.liveStream(
        () => "/api/deployments/" + id + "/stream?after=" + encodeURIComponent(newest || "0-0"),
        { event: live, reset: () => { reset(); } },
      );
    })
    .catch((error) => Activity.setStatus("Error: " + error.message, "error"));
})();
