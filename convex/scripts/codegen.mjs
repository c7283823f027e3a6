// Offline stand-in for `npx convex codegen`, which needs a live deployment.
//
// Writes convex/_generated/{api,server}.{js,d.ts} and dataModel.d.ts in the form the CLI
// emits for an app that uses components (dynamic api types: ApiFromModules over every
// module, FilterApi for api/internal, components typed from each component's published
// `_generated/component.js`). Entry points follow the CLI's rules (bundler `entryPoints`):
// .ts/.js files outside _generated, not schema.ts, no dotfiles, no second dot (so
// *.test.ts and convex.config.ts are skipped), no spaces.
// Run from the project root (convex/): `npm run codegen`.
import { readdirSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const FUNCTIONS = join(process.cwd(), "convex");
const OUT = join(FUNCTIONS, "_generated");
/** Components used by convex.config.ts: name → package (its `_generated/component.js`). */
const COMPONENTS = {
  rateLimiter: "@convex-dev/rate-limiter",
  migrations: "@convex-dev/migrations",
};

const EXTENSIONS = [".js", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".cts", ".jsx"];

function* walk(dir) {
  for (const entry of readdirSync(dir, { withFileTypes: true }).sort((a, b) =>
    a.name < b.name ? -1 : a.name > b.name ? 1 : 0,
  )) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      if (existsSync(join(path, "convex.config.ts"))) continue; // a nested component
      yield* walk(path);
    } else if (entry.isFile()) {
      yield path;
    }
  }
}

function entryPoints() {
  const out = [];
  for (const path of walk(FUNCTIONS)) {
    const rel = relative(FUNCTIONS, path).split(sep).join("/");
    const base = rel.split("/").pop();
    if (!EXTENSIONS.some((ext) => rel.endsWith(ext))) continue;
    if (rel.startsWith("_generated/")) continue;
    if (base.startsWith(".") || base.startsWith("#")) continue;
    if (base === "schema.ts" || base === "schema.js") continue;
    if ((base.match(/\./g) || []).length > 1) continue;
    if (rel.includes(" ")) continue;
    out.push(rel);
  }
  return out.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

const importPath = (p) => {
  const i = p.lastIndexOf(".");
  return i === -1 ? p : p.slice(0, i);
};
const RESERVED = new Set(
  ("break case catch class const continue debugger default delete do else export extends " +
    "false finally for function if import in instanceof new null return super switch this " +
    "throw true try typeof var void while with let static yield await enum implements " +
    "interface package private protected public").split(" "),
);
const ident = (p) => {
  let id = importPath(p).replace(/\//g, "_").replace(/-/g, "_");
  if (["fullApi", "api", "internal", "components"].includes(id)) id = `${id}_`;
  if (RESERVED.has(id)) id = `${id}_`;
  return id;
};

const header = (what) => `/* eslint-disable */
/**
 * ${what}
 *
 * THIS CODE IS AUTOMATICALLY GENERATED.
 *
 * To regenerate, run \`npx convex dev\` (or, offline, \`npm run codegen\`).
 * @module
 */
`;

const apiComment = (name, type) => `
/**
 * A utility for referencing Convex functions in your app's ${type} API.
 *
 * Usage:
 * \`\`\`js
 * const myFunctionReference = ${name}.myModule.myFunction;
 * \`\`\`
 */`;

const modules = entryPoints();

const apiDTS = `${header("Generated `api` utility.")}
${modules.map((m) => `import type * as ${ident(m)} from "../${importPath(m)}.js";`).join("\n")}

import type {
  ApiFromModules,
  FilterApi,
  FunctionReference,
} from "convex/server";

declare const fullApi: ApiFromModules<{
${modules.map((m) => `  "${importPath(m)}": typeof ${ident(m)},`).join("\n")}
}>;
${apiComment("api", "public")}
export declare const api: FilterApi<typeof fullApi, FunctionReference<any, "public">>;
${apiComment("internal", "internal")}
export declare const internal: FilterApi<typeof fullApi, FunctionReference<any, "internal">>;

export declare const components: {
${Object.entries(COMPONENTS)
  .map(([name, pkg]) => `  "${name}": import("${pkg}/_generated/component.js").ComponentApi<"${name}">,`)
  .join("\n")}
};
`;

const apiJS = `${header("Generated `api` utility.")}
import { anyApi, componentsGeneric } from "convex/server";
${apiComment("api", "public")}
export const api = anyApi;
export const internal = anyApi;
export const components = componentsGeneric();
`;

const dataModelDTS = `${header("Generated data model types.")}
import type {
  DataModelFromSchemaDefinition,
  DocumentByName,
  TableNamesInDataModel,
  SystemTableNames,
} from "convex/server";
import type { GenericId } from "convex/values";
import schema from "../schema.js";

/**
 * The names of all of your Convex tables.
 */
export type TableNames = TableNamesInDataModel<DataModel>;

/**
 * The type of a document stored in Convex.
 *
 * @typeParam TableName - A string literal type of the table name (like "users").
 */
export type Doc<TableName extends TableNames> = DocumentByName<DataModel, TableName>;

/**
 * An identifier for a document in Convex.
 *
 * @typeParam TableName - A string literal type of the table name (like "users").
 */
export type Id<TableName extends TableNames | SystemTableNames> = GenericId<TableName>;

/**
 * A type describing your Convex data model.
 */
export type DataModel = DataModelFromSchemaDefinition<typeof schema>;
`;

// server.{js,d.ts}: the CLI's own template (it has no dependency on a deployment).
const { serverCodegen } = require(
  join(process.cwd(), "node_modules/convex/dist/cjs/cli/codegen_templates/server.js"),
);
const server = serverCodegen({ useTypeScript: false });

mkdirSync(OUT, { recursive: true });
const files = {
  "api.d.ts": apiDTS,
  "api.js": apiJS,
  "dataModel.d.ts": dataModelDTS,
  "server.d.ts": server.DTS,
  "server.js": server.JS,
};
for (const [name, text] of Object.entries(files)) {
  writeFileSync(join(OUT, name), text.trimStart());
}
console.log(`wrote ${Object.keys(files).length} files for ${modules.length} modules: ${modules.join(", ")}`);
