// `make convex-migrate`: start every data migration the deployment has not finished
// (migrations:run) and wait until migrations:status says each is done. The deployment is
// CONVEX_SELF_HOSTED_URL with CONVEX_SELF_HOSTED_ADMIN_KEY, as for `npx convex deploy`; both
// functions are internal, called over the backend's HTTP API with the admin key.
//
// Stopping this script stops only the waiting: the batches run on the deployment's
// scheduler. Running it again resumes a failed or stopped migration at its cursor, or just
// waits for one in progress; a finished one is not run again.
//
// An optional JSON argument is passed to migrations:run: '{"dryRun": true}' runs the first
// pending batch and rolls it back (nothing to wait for then), '{"reset": true}' starts over.
// Exit status: 0 all done, 1 a migration failed or was canceled, 2 bad configuration.

const POLL_MS = Number(process.env.CONVEX_MIGRATE_POLL_MS ?? 2000);
const REQUEST_TIMEOUT_MS = 30_000;

function fail(message, code = 1) {
  console.error(`convex-migrate: ${message}`);
  process.exit(code);
}

const rawUrl = process.env.CONVEX_SELF_HOSTED_URL ?? "";
const adminKey = process.env.CONVEX_SELF_HOSTED_ADMIN_KEY ?? "";
if (rawUrl === "") fail("set CONVEX_SELF_HOSTED_URL (the deployment's URL)", 2);
if (adminKey === "") fail("set CONVEX_SELF_HOSTED_ADMIN_KEY (the deployment's admin key)", 2);
let base;
try {
  base = new URL(rawUrl);
} catch {
  fail("CONVEX_SELF_HOSTED_URL is not a URL", 2);
}
// What is shown of the deployment: never credentials a URL may carry.
const shown = `${base.protocol}//${base.host}${base.pathname.replace(/\/+$/, "")}`;
if (base.username !== "" || base.password !== "") {
  // fetch (as the convex CLI's) refuses them; the admin key is what authenticates.
  fail(`CONVEX_SELF_HOSTED_URL carries credentials: give it without them (${shown})`, 2);
}
if (base.protocol !== "http:" && base.protocol !== "https:") {
  fail(`CONVEX_SELF_HOSTED_URL must start with http:// or https:// (${shown})`, 2);
}

let runArgs = {};
if (process.argv[2] !== undefined && process.argv[2].trim() !== "") {
  try {
    runArgs = JSON.parse(process.argv[2]);
  } catch {
    fail(`the argument must be a JSON object for migrations:run, got ${process.argv[2]}`, 2);
  }
  if (typeof runArgs !== "object" || runArgs === null || Array.isArray(runArgs)) {
    fail(`the argument must be a JSON object for migrations:run, got ${process.argv[2]}`, 2);
  }
}

async function call(kind, path, args) {
  const url = new URL(`api/${kind}`, base.href.endsWith("/") ? base.href : `${base.href}/`);
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Convex ${adminKey}` },
      body: JSON.stringify({ path, args, format: "json" }),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (error) {
    fail(`cannot reach ${shown} (${error.cause?.code ?? error.name})`);
  }
  if (response.status === 401 || response.status === 403) {
    fail(`${shown} refused the admin key (CONVEX_SELF_HOSTED_ADMIN_KEY)`, 2);
  }
  const body = await response.json().catch(() => undefined);
  if (!response.ok || body === undefined) fail(`${path}: HTTP ${response.status} from ${shown}`);
  if (body.status !== "success") {
    const hint = /Could not find/.test(body.errorMessage ?? "") ? " (run `make convex-deploy` first)" : "";
    fail(`${path}: ${body.errorMessage}${hint}`);
  }
  return body.value;
}

const started = await call("mutation", "migrations:run", runArgs);
console.log(JSON.stringify(started, null, 2));
if (runArgs.dryRun === true) process.exit(0);

const said = new Map();
for (;;) {
  const statuses = await call("query", "migrations:status", {});
  for (const s of statuses) {
    const line = `${s.name}: ${s.state}, ${s.processed} rows processed${s.error ? `: ${s.error}` : ""}`;
    if (said.get(s.name) !== line) console.log(line);
    said.set(s.name, line);
  }
  const stopped = statuses.filter((s) => s.state === "failed" || s.state === "canceled");
  if (stopped.length > 0) {
    fail(
      `${stopped.map((s) => s.name).join(", ")} stopped; rows migrated so far stay migrated. ` +
        "Fix the cause, then run `make convex-migrate` again: it resumes where it stopped.",
    );
  }
  if (statuses.every((s) => s.isDone)) break;
  await new Promise((resolve) => setTimeout(resolve, POLL_MS));
}
console.log(`every migration is done on ${shown}`);
