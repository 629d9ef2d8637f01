// Load a workflow into the ComfyUI editor in headless Chromium and report what the editor made of it.
//
//   NODE_PATH=<dir with playwright-core> node editor_driver.js --url http://127.0.0.1:PORT \
//       --workflow wf.json --chromium /usr/bin/chromium --out result.json \
//       [--screenshot shot.png] [--timeout 180000]
//
// Writes JSON to --out: {format, loaded_nodes, types, missing_types, problems, blocked, api, ui,
// seconds}. The browser never leaves loopback: every other host name resolves to nothing.
// Used by tests/host/comfy_server.py:editor_check (which sorts `problems` into errors and notes).
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

function parseArgs(argv) {
  const opts = { timeout: '180000' };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--')) throw new Error('bad argument ' + argv[i]);
    opts[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of ['url', 'workflow', 'chromium', 'out']) {
    if (!opts[k]) throw new Error('missing --' + k);
  }
  return opts;
}

const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const timeout = Number(opts.timeout);
  const base = opts.url.replace(/\/$/, '');
  const started = Date.now();
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    timeout,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-quic', '--disable-domain-reliability', '--metrics-recording-only',
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost',
    ],
  });
  const problems = [];
  const blocked = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.setDefaultTimeout(timeout);
    page.on('pageerror', (e) => problems.push('pageerror: ' + e.message));
    page.on('console', (m) => { if (m.type() === 'error') problems.push('console: ' + m.text()); });
    page.on('response', (r) => { if (r.status() >= 400) problems.push(`http ${r.status()}: ${r.url()}`); });
    page.on('requestfailed', (r) => {
      if (r.url().startsWith(base)) problems.push('request failed: ' + r.url());
      else blocked.push(r.url());
    });

    await page.goto(base + '/', { waitUntil: 'load' });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas);
    await wait(1000);
    await page.keyboard.press('Escape').catch(() => {});

    const data = JSON.parse(fs.readFileSync(opts.workflow, 'utf8'));
    const result = await page.evaluate(async ({ data, name }) => {
      const app = window.app;
      const isUi = Array.isArray(data.nodes);
      if (isUi) {
        await app.loadGraphData(data, true, true, name);
      } else {
        const api = data.prompt && typeof data.prompt === 'object' ? data.prompt : data;
        await app.loadApiJson(api, name);
      }
      const defs = await (await fetch('/object_info')).json();
      const registered = window.LiteGraph && window.LiteGraph.registered_node_types;
      const frontendOnly = new Set(['Note', 'MarkdownNote', 'Reroute', 'PrimitiveNode']);
      const known = (t) => (t in defs) || frontendOnly.has(t) || !!(registered && registered[t] &&
                                                                    registered[t].nodeData);
      const nodes = app.graph._nodes || app.graph.nodes || [];
      const wanted = isUi ? data.nodes.map((n) => n.type)
                          : Object.values(data.prompt || data).map((n) => n.class_type);
      const types = nodes.map((n) => n.type);
      const missing = [...new Set([...wanted, ...types].filter((t) => !known(t)))];
      const p = await app.graphToPrompt();
      return { format: isUi ? 'ui' : 'api', loaded_nodes: nodes.length, types, missing_types: missing,
               api: p.output, ui: p.workflow };
    }, { data, name: path.basename(opts.workflow) });

    await wait(1500);  // let late errors (widget set-up, extensions) arrive
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot });
    result.problems = [...new Set(problems)];
    result.blocked = [...new Set(blocked)];
    result.seconds = (Date.now() - started) / 1000;
    fs.writeFileSync(opts.out, JSON.stringify(result));
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e && e.stack ? e.stack : e); process.exit(1); });
