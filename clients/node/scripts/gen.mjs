// Generates src/gen (TypeScript, protoc-gen-es) from the repository's protos/runplane/v1 with the
// repository's buf (node_modules/.bin/buf at the root, installed by scripts/setup.sh).
//
//   node scripts/gen.mjs           rewrite src/gen
//   node scripts/gen.mjs --check   exit 1 when src/gen differs from what the protos make
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const root = path.resolve(pkg, "../..");
const committed = path.join(pkg, "src", "gen");
const check = process.argv.includes("--check");

function fail(message) {
  console.error(`gen: ${message}`);
  process.exit(1);
}

const buf = path.join(root, "node_modules", ".bin", "buf");
if (!fs.existsSync(buf)) fail(`${buf} missing: run scripts/setup.sh`);
if (!fs.existsSync(path.join(pkg, "node_modules", ".bin", "protoc-gen-es"))) {
  fail("clients/node/node_modules missing: run scripts/setup.sh (npm ci in clients/node)");
}

const out = fs.mkdtempSync(path.join(os.tmpdir(), "runplane-node-gen-"));
try {
  execFileSync(buf, ["generate", "--template", "clients/node/buf.gen.yaml", "-o", out], {
    cwd: root,
    stdio: ["ignore", "inherit", "inherit"],
  });
  const made = listFiles(out);
  if (check) {
    const have = fs.existsSync(committed) ? listFiles(committed) : [];
    const stale = [...new Set([...made, ...have])].filter((file) => {
      const a = path.join(out, file);
      const b = path.join(committed, file);
      return !fs.existsSync(a) || !fs.existsSync(b) || !fs.readFileSync(a).equals(fs.readFileSync(b));
    });
    if (stale.length > 0) {
      fail(`clients/node/src/gen is stale (${stale.join(", ")}): run \`make gen\``);
    }
    console.log(`gen: clients/node/src/gen is up to date (${made.length} files)`);
  } else {
    fs.rmSync(committed, { recursive: true, force: true });
    fs.cpSync(out, committed, { recursive: true });
    console.log(`gen: wrote ${made.length} files to clients/node/src/gen`);
  }
} finally {
  fs.rmSync(out, { recursive: true, force: true });
}

function listFiles(dir) {
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => path.relative(dir, path.join(entry.parentPath, entry.name)))
    .sort();
}
