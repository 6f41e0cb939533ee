// Parse every ```mermaid block of the Markdown files given, with mermaid's own parser and no browser (jsdom stands in
// for the DOM mermaid expects): one line per block, "ok FILE:LINE" or "error FILE:LINE: message"; exit 1 on any error.
import { readFileSync } from "node:fs";
import { JSDOM } from "jsdom";
const dom = new JSDOM("<!doctype html><html><body></body></html>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.DOMParser = dom.window.DOMParser;
Object.defineProperty(globalThis, "navigator", { value: dom.window.navigator, configurable: true });
const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false });
let failed = 0;
for (const file of process.argv.slice(2)) {
  const lines = readFileSync(file, "utf8").split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() !== "```mermaid") continue;
    const start = i + 1;
    const body = [];
    for (i++; i < lines.length && lines[i].trim() !== "```"; i++) body.push(lines[i]);
    try {
      await mermaid.parse(body.join("\n"));
      console.log(`ok ${file}:${start}`);
    } catch (error) {
      failed++;
      console.log(`error ${file}:${start}: ${String(error.message ?? error).split("\n").slice(0, 4).join(" ")}`);
    }
  }
}
process.exit(failed ? 1 : 0);
