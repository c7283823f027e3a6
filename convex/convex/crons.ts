import { cronJobs } from "convex/server";
import { internal } from "./_generated/api";

const crons = cronJobs();

// Delete raw rows past the retention (CONVEX_GUARD_RETENTION_DAYS, default 30 days).
crons.hourly("retention", { minuteUTC: 17 }, internal.retention.purge, {});

export default crons;
