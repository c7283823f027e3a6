/* eslint-disable */
/**
 * Generated `api` utility.
 *
 * THIS CODE IS AUTOMATICALLY GENERATED.
 *
 * To regenerate, run `npx convex dev` (or, offline, `npm run codegen`).
 * @module
 */

import type * as ai_analytics from "../ai/analytics.js";
import type * as ai_rateLimiting from "../ai/rateLimiting.js";
import type * as alerts from "../alerts.js";
import type * as apiKeys from "../apiKeys.js";
import type * as bots from "../bots.js";
import type * as crons from "../crons.js";
import type * as dashboard from "../dashboard.js";
import type * as embeddings_analytics from "../embeddings/analytics.js";
import type * as embeddings_rateLimiting from "../embeddings/rateLimiting.js";
import type * as guard from "../guard.js";
import type * as lib_addresses from "../lib/addresses.js";
import type * as lib_alerts from "../lib/alerts.js";
import type * as lib_audit from "../lib/audit.js";
import type * as lib_bots from "../lib/bots.js";
import type * as lib_keys from "../lib/keys.js";
import type * as lib_limits from "../lib/limits.js";
import type * as lib_logs from "../lib/logs.js";
import type * as lib_validators from "../lib/validators.js";
import type * as limits from "../limits.js";
import type * as logs from "../logs.js";
import type * as migrations from "../migrations.js";
import type * as retention from "../retention.js";

import type {
  ApiFromModules,
  FilterApi,
  FunctionReference,
} from "convex/server";

declare const fullApi: ApiFromModules<{
  "ai/analytics": typeof ai_analytics,
  "ai/rateLimiting": typeof ai_rateLimiting,
  "alerts": typeof alerts,
  "apiKeys": typeof apiKeys,
  "bots": typeof bots,
  "crons": typeof crons,
  "dashboard": typeof dashboard,
  "embeddings/analytics": typeof embeddings_analytics,
  "embeddings/rateLimiting": typeof embeddings_rateLimiting,
  "guard": typeof guard,
  "lib/addresses": typeof lib_addresses,
  "lib/alerts": typeof lib_alerts,
  "lib/audit": typeof lib_audit,
  "lib/bots": typeof lib_bots,
  "lib/keys": typeof lib_keys,
  "lib/limits": typeof lib_limits,
  "lib/logs": typeof lib_logs,
  "lib/validators": typeof lib_validators,
  "limits": typeof limits,
  "logs": typeof logs,
  "migrations": typeof migrations,
  "retention": typeof retention,
}>;

/**
 * A utility for referencing Convex functions in your app's public API.
 *
 * Usage:
 * ```js
 * const myFunctionReference = api.myModule.myFunction;
 * ```
 */
export declare const api: FilterApi<typeof fullApi, FunctionReference<any, "public">>;

/**
 * A utility for referencing Convex functions in your app's internal API.
 *
 * Usage:
 * ```js
 * const myFunctionReference = internal.myModule.myFunction;
 * ```
 */
export declare const internal: FilterApi<typeof fullApi, FunctionReference<any, "internal">>;

export declare const components: {
  "rateLimiter": import("@convex-dev/rate-limiter/_generated/component.js").ComponentApi<"rateLimiter">,
  "migrations": import("@convex-dev/migrations/_generated/component.js").ComponentApi<"migrations">,
};
