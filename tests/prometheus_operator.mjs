// Validate Prometheus Operator objects with the schemas of @kubernetes-models/prometheus-operator.
// usage: node prometheus_operator.mjs <npm prefix> < objects.json
// Reads a JSON array of objects; writes a JSON array with, for each, null (valid) or the validator's errors.
//
// The schemas, like the CRDs they come from, allow fields they do not name (no additionalProperties: false), while
// the API server drops such fields: a misspelt field would pass validation and vanish on the server. So every field
// of a valid object (outside metadata, which the API server checks itself) is probed: its value is replaced with one
// of a JSON type no schema of that field accepts; if the object still validates, no schema names the field, and it is
// reported as unknown.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [prefix] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(0, "utf8"));

function valid(Model, object) {
  try {
    new Model(object).validate();
    return null;
  } catch (error) {
    return String(error.message ?? error);
  }
}

// A value of another JSON type than `value`, that a schema typing this field rejects.
function wrongType(value) {
  return Array.isArray(value) || (value !== null && typeof value === "object") ? "probe" : [["probe"]];
}

function* paths(value, path) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) yield* paths(value[i], [...path, i]);
  } else if (value !== null && typeof value === "object") {
    for (const key of Object.keys(value)) {
      yield [...path, key];
      yield* paths(value[key], [...path, key]);
    }
  }
}

function replaced(object, path, value) {
  const copy = structuredClone(object);
  let node = copy;
  for (const step of path.slice(0, -1)) node = node[step];
  node[path[path.length - 1]] = value;
  return copy;
}

function unknownFields(Model, object) {
  const unknown = [];
  for (const [key, value] of Object.entries(object)) {
    if (["apiVersion", "kind", "metadata"].includes(key)) continue;
    for (const path of [[key], ...paths(value, [key])]) {
      if (typeof path[path.length - 1] === "number") continue; // list items: their fields are probed
      let current = object;
      for (const step of path) current = current[step];
      if (valid(Model, replaced(object, path, wrongType(current))) === null) unknown.push(path.join("."));
    }
  }
  return unknown;
}

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
  const error = valid(Model, object);
  if (error !== null) {
    results.push(error);
    continue;
  }
  const unknown = unknownFields(Model, object);
  results.push(unknown.length ? `fields no schema names (the API server would drop them): ${unknown.join(", ")}` : null);
}
process.stdout.write(JSON.stringify(results));
