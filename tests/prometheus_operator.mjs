// Validate Prometheus Operator objects with the schemas of @kubernetes-models/prometheus-operator.
// usage: node prometheus_operator.mjs <npm prefix> < objects.json
// Reads a JSON array of objects; writes a JSON array with, for each, null (valid) or the validator's errors.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [prefix] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const object of objects) {
  const [group, version] = String(object.apiVersion).split("/");
  const file = `${prefix}/node_modules/@kubernetes-models/prometheus-operator/${group}/${version}/${object.kind}.js`;
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[object.kind];
  } catch (error) {
    results.push(`no schema for ${object.apiVersion} ${object.kind}: ${error.message}`);
    continue;
  }
  try {
    new Model(object).validate();
    results.push(null);
  } catch (error) {
    results.push(String(error.message ?? error));
  }
}
process.stdout.write(JSON.stringify(results));
