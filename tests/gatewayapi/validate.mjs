// Validate Gateway API objects against the upstream schemas (@kubernetes-models/gateway-api,
// generated from Gateway API's CRDs). argv[2]: the npm prefix the package is installed under.
// stdin: a JSON array of objects; stdout: a JSON array, per object a list of error strings, or
// null when the package has no model for that apiVersion/kind.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = join(process.argv[2], "node_modules", "@kubernetes-models", "gateway-api");
const objects = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const obj of objects) {
  const [group, version] = String(obj.apiVersion).split("/");
  if (!version || !/^[A-Za-z]+$/.test(String(obj.kind))) {
    out.push(null);
    continue;
  }
  const file = join(root, group, version, `${obj.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[obj.kind];
  } catch {
    out.push(null);
    continue;
  }
  try {
    new Model(obj).validate();
    out.push([]);
  } catch (err) {
    out.push(String(err.message).split(", "));
  }
}
process.stdout.write(JSON.stringify(out));
