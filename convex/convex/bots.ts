// Bot event counts for the Python store.
import { v } from "convex/values";
import { internalQuery } from "./_generated/server";

/** Counting stops here: a caller needs "more than N", never an exact large count. */
export const COUNT_CAP = 1000;

/** How many events the fingerprint has had since `since` (inclusive), capped at COUNT_CAP. */
export const countSince = internalQuery({
  args: { fingerprint: v.string(), since: v.number() },
  returns: v.number(),
  handler: async (ctx, { fingerprint, since }) => {
    const rows = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_fingerprint", (q) => q.eq("fingerprint", fingerprint).gte("timestamp", since))
      .take(COUNT_CAP);
    return rows.length;
  },
});
