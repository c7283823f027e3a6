// JSON for Convex values as the backend writes them: convex_encoded_json, with every number
// written as a float (`2.0`, not `2`): the Python client rejects `2` where it expects a float.
import { convexToJson, jsonToConvex, type Value } from "../../convex/tests/server-deps";

/** JSON text spliced verbatim into a message by `stringifyMessage`. */
export class RawJson {
  constructor(readonly text: string) {}
}

/**
 * Serialize a protocol message: numbers as JSON writes them (ids and versions are integers),
 * RawJson (encoded function values) as is.
 */
export function stringifyMessage(value: unknown): string {
  return stringify(value, false);
}

/** Serialize an already JSON-safe value, writing whole numbers with a `.0`. */
export function stringifyFloats(value: unknown): string {
  return stringify(value, true);
}

function stringify(value: unknown, floats: boolean): string {
  if (value === null || value === undefined) return "null";
  if (value instanceof RawJson) return value.text;
  switch (typeof value) {
    case "number":
      if (!Number.isFinite(value)) throw new Error(`not JSON: ${value}`);
      return floats && Number.isInteger(value) && Math.abs(value) < 1e21
        ? `${value}.0`
        : JSON.stringify(value);
    case "string":
    case "boolean":
      return JSON.stringify(value);
    case "object": {
      if (Array.isArray(value)) return `[${value.map((v) => stringify(v, floats)).join(",")}]`;
      const parts: string[] = [];
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (v === undefined) continue;
        parts.push(`${JSON.stringify(k)}:${stringify(v, floats)}`);
      }
      return `{${parts.join(",")}}`;
    }
    default:
      throw new Error(`not JSON: ${typeof value}`);
  }
}

/**
 * A Convex value as convex_encoded_json text (special floats, int64 and bytes as `$`
 * objects, every number a float), ready to splice into a message.
 */
export function encodeValue(value: Value): RawJson {
  return new RawJson(stringifyFloats(convexToJson(value)));
}

/** Function arguments from a request: `{...}` or `[{...}]`, plain or convex_encoded_json. */
export function decodeArgs(raw: unknown): Record<string, Value> {
  const one = Array.isArray(raw) ? (raw.length === 0 ? {} : raw[0]) : (raw ?? {});
  if (Array.isArray(raw) && raw.length > 1) {
    throw new Error("Convex functions take one argument object");
  }
  if (typeof one !== "object" || one === null || Array.isArray(one)) {
    throw new Error("Arguments to a Convex function must be an object");
  }
  return jsonToConvex(one as never) as Record<string, Value>;
}
