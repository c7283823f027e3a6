// The dependencies of the loopback test server (tests/convex_server/, outside this npm
// project), re-exported from here so that they resolve from this project's node_modules,
// as the same module instances the functions use.
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";

export { convexTest } from "convex-test";
export { WebSocketServer, WebSocket, type RawData } from "ws";
export { ConvexError, convexToJson, jsonToConvex, type Value } from "convex/values";
export { makeFunctionReference } from "convex/server";

const require = createRequire(import.meta.url);

/** The installed package's root folder (its package.json must be exported). */
export function packageDir(name: string, from?: string): string {
  const req = from === undefined ? require : createRequire(from);
  return dirname(req.resolve(`${name}/package.json`));
}

/** The folder of this npm project (convex/): its functions live in convex/convex/. */
export const PROJECT_DIR = fileURLToPath(new URL("..", import.meta.url));
