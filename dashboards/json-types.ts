/**
 * The JSON form of a TypeScript type.
 *
 * Grafana's schema types use TypeScript enums (`ThresholdsMode.Absolute`),
 * while a dashboard file holds their plain values (`"absolute"`). `Json<T>`
 * replaces every string enum by the union of its values and leaves the rest
 * of the structure as it is, so a dashboard literal is checked field by
 * field, with excess-property checks, against the published schema.
 */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer E>
      ? Array<Json<E>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;
