/// <reference types="vite/client" />
// A fresh convex-test deployment of our functions with the rate limiter and migrations components.
import { register as registerMigrations } from "@convex-dev/migrations/test";
import { register } from "@convex-dev/rate-limiter/test";
import { convexTest } from "convex-test";
import schema from "../convex/schema";

export const modules = import.meta.glob("../convex/**/*.*s");

/** The options form with `transactionLimits`: Convex's per-transaction limits are enforced. */
export function newDeployment() {
  const t = convexTest({ schema, modules, transactionLimits: true });
  register(t, "rateLimiter");
  registerMigrations(t, "migrations");
  return t;
}

export type Deployment = ReturnType<typeof newDeployment>;

/** A minute-aligned epoch time (ms) to start tests at. */
export const T0 = 28_333_333 * 60_000;
