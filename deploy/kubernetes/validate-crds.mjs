// Validates cert-manager, approver-policy and trust-manager objects against their CRD schemas, as compiled into validators by
// @kubernetes-models/cert-manager (deploy/kubernetes/tools). Objects come as JSON, one per line, on stdin;
// each problem is printed as one line, and the exit status is 1 if there was any.
//
//   node validate-crds.mjs deploy/kubernetes/tools/node_modules/@kubernetes-models/cert-manager < objects.jsonl
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = process.argv[2];
const model = async (group, version, kind) =>
  (await import(pathToFileURL(join(root, group, version, `${kind}.js`)).href))[kind];
const models = {
  "cert-manager.io/v1/Certificate": await model("cert-manager.io", "v1", "Certificate"),
  "cert-manager.io/v1/Issuer": await model("cert-manager.io", "v1", "Issuer"),
  "cert-manager.io/v1/ClusterIssuer": await model("cert-manager.io", "v1", "ClusterIssuer"),
  "trust.cert-manager.io/v1alpha1/Bundle": await model("trust.cert-manager.io", "v1alpha1", "Bundle"),
  "policy.cert-manager.io/v1alpha1/CertificateRequestPolicy": await model(
    "policy.cert-manager.io",
    "v1alpha1",
    "CertificateRequestPolicy",
  ),
};

let failed = 0;
for (const line of readFileSync(0, "utf8").split("\n").filter(Boolean)) {
  const object = JSON.parse(line);
  const name = `${object.kind} ${object.metadata?.name}`;
  const Model = models[`${object.apiVersion}/${object.kind}`];
  if (!Model) {
    console.log(`${name}: no schema for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    console.log(`${name}: ${error.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
