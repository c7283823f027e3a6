// Writes limits.json from AI_LIMITS (convex/ai/rateLimiting.ts): `npm run limits:json`.
// The vitest suite checks the file equals the table; the Python suite checks its preset
// equals the file, so the two definitions cannot drift apart.
import { writeFileSync } from "node:fs";
import { AI_LIMITS } from "../convex/ai/rateLimiting";

writeFileSync(new URL("../limits.json", import.meta.url), JSON.stringify(AI_LIMITS, null, 2) + "\n");
console.log(`wrote limits.json (${Object.keys(AI_LIMITS).length} limits)`);
