// End-to-end test of the built page in Debian's Chromium with WebGPU enabled.
//
// Needs BASE_URL (the served dist/, for example http://127.0.0.1:8099/); scripts/e2e.sh sets it
// up. The tests run in order and share one browser: the later ones use the image the earlier ones
// dropped. They fail when the page computed on anything but WebGPU.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { chromium } from 'playwright-core';

const BASE_URL = process.env.BASE_URL;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const REPO_ROOT = path.resolve(import.meta.dirname, '../..');

// Model loading, kernel compilation and analysis run on SwiftShader, a CPU implementation of
// WebGPU, when the machine has no GPU; these limits leave room for that.
const MODEL_TIMEOUT_MS = 180_000;
const ANALYSIS_TIMEOUT_MS = 180_000;

// --enable-unsafe-webgpu exposes navigator.gpu in Chromium on Linux; on a machine without a GPU
// Chromium then offers its SwiftShader adapter. The other switches keep the run offline and
// reproducible.
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
  '--enable-unsafe-webgpu',
];

/** Returns a JPEG photograph: a committed fixture if there is one, else one made by ImageMagick. */
function photograph(tempDir) {
  const fixtures = path.join(REPO_ROOT, 'fixtures/images');
  if (fs.existsSync(fixtures)) {
    const jpegs = fs.readdirSync(fixtures).filter((name) => name.endsWith('.jpg')).sort();
    const preferred = jpegs.find((name) => name === 'chelsea.jpg') ?? jpegs[0];
    if (preferred) {
      return path.join(fixtures, preferred);
    }
  }
  // ImageMagick's built-in "rose:" is a 70 x 46 photograph, used only when fixtures/images has no
  // JPEG.
  const file = path.join(tempDir, 'rose.jpg');
  execFileSync('convert', ['rose:', '-resize', '300x200', '-quality', '90', file]);
  return file;
}

describe('clip-lens page', () => {
  let context;
  let page;
  let tempDir;
  let photoPath;
  let photoName;
  const requests = [];
  const pageErrors = [];
  // The neuron the tests follow, read from the first bar on the image list.
  let neuron;

  /** Records every request and every uncaught error or panic of `target`. */
  function watch(target) {
    target.on('request', (request) => {
      requests.push({
        method: request.method(),
        url: request.url(),
        bodyBytes: request.postDataBuffer()?.length ?? 0,
      });
    });
    target.on('pageerror', (error) => pageErrors.push(`uncaught: ${error.message}`));
    target.on('console', (message) => {
      if (message.text().includes('panicked at')) {
        pageErrors.push(`panic: ${message.text()}`);
      }
    });
  }

  async function waitForModel(target) {
    await target.waitForFunction(() => document.body.dataset.backend !== undefined, null, {
      timeout: MODEL_TIMEOUT_MS,
    });
    const backend = await target.evaluate(() => document.body.dataset.backend);
    if (backend !== 'webgpu') {
      const alerts = await target.locator('[role="alert"]').allTextContents();
      assert.fail(`the page runs on "${backend}", not WebGPU; alerts: ${JSON.stringify(alerts)}`);
    }
    await target.waitForFunction(
      () => !document.querySelector('.progress') && document.querySelector('#model')?.textContent !== 'none loaded yet',
      null,
      { timeout: MODEL_TIMEOUT_MS },
    );
    const alerts = await target.locator('.alerts [role="alert"]').allTextContents();
    assert.deepEqual(alerts, [], 'no alert while the default model loads');
  }

  /** Drops files on the drop zone with a synthetic drag-and-drop event. */
  async function dropFiles(target, files) {
    const encoded = files.map(({ name, type, bytes }) => ({ name, type, base64: Buffer.from(bytes).toString('base64') }));
    await target.evaluate((encodedFiles) => {
      const transfer = new DataTransfer();
      for (const { name, type, base64 } of encodedFiles) {
        const bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type }));
      }
      const zone = document.querySelector('.dropzone');
      zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }, encoded);
  }

  function resultCard(target, name) {
    return target.locator(`.image-result[data-image-name="${name}"]`);
  }

  before(async () => {
    assert.ok(BASE_URL, 'BASE_URL must name the served site, for example http://127.0.0.1:8099/');
    tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'clip-lens-e2e-'));
    photoPath = photograph(tempDir);
    photoName = path.basename(photoPath);
    context = await chromium.launchPersistentContext(path.join(tempDir, 'profile'), {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
    });
    context.on('page', watch);
    page = context.pages()[0] ?? (await context.newPage());
    watch(page);
  });

  after(async () => {
    await context?.close();
    if (tempDir) {
      fs.rmSync(tempDir, { recursive: true, force: true });
    }
  });

  it('runs the default model on WebGPU', async () => {
    await page.goto(BASE_URL);
    await waitForModel(page);
    const label = await page.locator('#backend').textContent();
    assert.match(label, /^WebGPU \(.+\)$/, 'the backend label names WebGPU and the adapter');
  });

  it('lists the top neurons of a photograph', async () => {
    await page.setInputFiles('#file-input', photoPath);
    const card = resultCard(page, photoName);
    await card.waitFor({ timeout: ANALYSIS_TIMEOUT_MS });

    const layers = card.locator('.layer');
    assert.equal(await layers.count(), 3, 'three analysed blocks');
    for (let i = 0; i < 3; i += 1) {
      const bars = layers.nth(i).locator('a.neuron-bar');
      assert.equal(await bars.count(), 20, `block list ${i} has 20 neurons`);
      const hrefs = await bars.evaluateAll((links) => links.map((link) => link.getAttribute('href')));
      for (const href of hrefs) {
        assert.match(href, /^#\/neuron\/\d+\/\d+$/);
      }
      const values = (await layers.nth(i).locator('.neuron-value').allTextContents()).map(Number);
      for (const value of values) {
        assert.ok(Number.isFinite(value), `effect norm ${value} is finite`);
        assert.ok(value >= 0, `effect norm ${value} is not negative`);
      }
      const sorted = [...values].sort((a, b) => b - a);
      assert.deepEqual(values, sorted, 'bars are sorted by effect norm, largest first');
    }
    const crop = card.locator('canvas.crop');
    assert.equal(await crop.count(), 1, 'the crop the model sees is drawn');
    // The default model ships with an atlas, so each list explains the significance marks.
    assert.equal(await card.locator('.layer .hint', { hasText: 'significant' }).count(), 3);
  });

  it('opens a neuron page from a bar', async () => {
    const firstBar = resultCard(page, photoName).locator('a.neuron-bar').first();
    const href = await firstBar.getAttribute('href');
    const [, layer, index] = href.match(/^#\/neuron\/(\d+)\/(\d+)$/);
    neuron = { layer, index, href, value: await firstBar.locator('.neuron-value').textContent() };

    await firstBar.click();
    await page.waitForFunction((expected) => location.hash === expected, href);
    const title = page.locator('#neuron-title');
    assert.equal(await title.textContent(), `Neuron ${index} of block ${layer}`);
    assert.equal(await page.locator('.effect-table td.effect-norm').first().textContent(), neuron.value);
    const heatmap = page.locator(`.heatmap[data-image-name="${photoName}"] canvas.heatmap-canvas`);
    assert.equal(await heatmap.count(), 1, 'a heatmap is drawn over the photograph');

    // The atlas describes the neuron.
    const summary = page.locator('.atlas-summary');
    assert.equal(await summary.count(), 1, 'the atlas section is shown');
    assert.ok(Number.isFinite(Number(await summary.locator('.threshold').textContent())), 'the threshold is a number');
    assert.ok(Number(await summary.locator('.selectivity').textContent()) >= 1, 'selectivity is at least 1');
    const terms = summary.locator('li.term');
    assert.ok((await terms.count()) > 0, 'the neuron has texts');
    const weights = await summary.locator('ol.positive li.term').evaluateAll((items) => items.map((item) => Number(item.dataset.weight)));
    for (const weight of weights) {
      assert.ok(weight > 0, 'positive texts have positive weights');
    }
    assert.deepEqual(weights, [...weights].sort((a, b) => b - a), 'positive texts are sorted, largest first');
    const negative = await summary.locator('ol.negative li.term').evaluateAll((items) => items.map((item) => Number(item.dataset.weight)));
    for (const weight of negative) {
      assert.ok(weight < 0, 'negative texts have negative weights');
    }
    assert.equal(await summary.locator('.aligned-classes li').count(), 10, 'ten aligned classes');
    neuron.term = await terms.first().locator('.term-text').textContent();
    assert.ok(await page.locator('h3', { hasText: 'Your images it is significant for' }).count(), 'the significant images are listed');
  });

  it('finds the neuron by searching for one of its texts', async () => {
    const search = page.locator('#search-input');
    await search.fill(neuron.term);
    await page.locator('.search-form button[type="submit"]').click();
    await page.waitForFunction(() => location.hash.startsWith('#/search/'));
    const link = page.locator(`.term-hits a[href="${neuron.href}"]`);
    // Term search lists at most 20 neurons, so the neuron is there unless 20 others use the
    // same text with larger weights.
    const hits = page.locator('.term-hits a.neuron-link');
    await hits.first().waitFor();
    assert.ok((await hits.count()) > 0, 'some neuron has the text');
    if ((await hits.count()) < 20) {
      assert.equal(await link.count(), 1, 'the neuron is among the hits');
    }
    // The direction search embeds the query with the text tower in the page.
    const source = page.locator('.embedding-source');
    await source.waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
    assert.equal(await source.getAttribute('data-source'), 'text tower');
    assert.equal(await page.locator('.direction-hits a.neuron-link').count(), 20);

    // The search permalink survives a reload.
    const hash = await page.evaluate(() => location.hash);
    await page.reload();
    await waitForModel(page);
    assert.equal(await page.evaluate(() => location.hash), hash);
    await page.locator('.term-hits a.neuron-link').first().waitFor();
    await page.locator('.embedding-source').waitFor({ timeout: ANALYSIS_TIMEOUT_MS });

    // A malformed query shows an empty result, not an error.
    await page.evaluate(() => { location.hash = '#/search/%FF%zz'; });
    await page.locator('.search-page .term-hits.empty').waitFor();
    await page.evaluate((href) => { location.hash = href; }, neuron.href);
    await page.locator('#neuron-title').waitFor();
  });

  it('tokenizes as open_clip does', async () => {
    const fixture = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'fixtures/text/tokenizer_cases.json'), 'utf8'));
    // ftfy's mojibake repair has no Rust port (engine/src/tokenizer.rs lists the differences).
    const known = new Set(['x<<end_of_text>']);
    const cases = fixture.cases.filter((c) => c.group !== 'mojibake' && !known.has(c.text));
    assert.ok(cases.length > 300, 'hundreds of strings');
    const results = await page.evaluate((texts) => texts.map((text) => {
      try {
        return Array.from(window.wasmBindings.clipLensTokenize(text));
      } catch (error) {
        return String(error);
      }
    }), cases.map((c) => c.text));
    const wrong = cases.filter((c, i) => JSON.stringify(results[i]) !== JSON.stringify(c.ids));
    assert.deepEqual(wrong.map((c) => c.text), [], 'every string gets open_clip\'s ids in the browser');
  });

  it('shows the neuron page again after a reload, from Cache Storage', async () => {
    const before = requests.length;
    await page.reload();
    await waitForModel(page);
    // The weights and the atlas tensors were verified and kept in Cache Storage on the first
    // visit, so the reload does not download them again.
    const downloaded = requests.slice(before).map((request) => request.url)
      .filter((url) => url.endsWith('.safetensors') || url.endsWith('.bin'));
    assert.deepEqual(downloaded, [], 'no weights or atlas tensors downloaded on reload');
    assert.equal(await page.locator('#neuron-title').textContent(), `Neuron ${neuron.index} of block ${neuron.layer}`);
    await page.locator('.no-images').waitFor();
    assert.equal(await page.locator('#file-input').count(), 1, 'the neuron page offers the drop zone');

    // Dropping the photograph on the neuron page fills it in.
    await page.setInputFiles('#file-input', photoPath);
    await page.locator(`.heatmap[data-image-name="${photoName}"] canvas.heatmap-canvas`).waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
  });

  it('opens the permalink in a new tab', async () => {
    const tab = await context.newPage();
    await tab.goto(new URL(neuron.href, BASE_URL).href);
    await waitForModel(tab);
    assert.equal(await tab.locator('#neuron-title').textContent(), `Neuron ${neuron.index} of block ${neuron.layer}`);
    await tab.locator('.no-images').waitFor();
    await tab.close();
  });

  it('explains nonsense neuron addresses', async () => {
    // The last block has no later block, so the lens never analyses it.
    const blocks = Number(await page.locator('#model').getAttribute('data-blocks'));
    const cases = [
      ['#/neuron/99/abc', /not a neuron address/],
      ['#/neuron/99/0', /no block 99/],
      [`#/neuron/${neuron.layer}/99999999`, /no neuron 99999999/],
      [`#/neuron/${blocks - 1}/0`, /not analysed/],
    ];
    for (const [hash, message] of cases) {
      await page.evaluate((target) => {
        location.hash = target;
      }, hash);
      const notice = page.locator('.invalid-neuron');
      await notice.waitFor();
      assert.match(await notice.textContent(), message, `message for ${hash}`);
    }
  });

  it('reports bad files by name and keeps earlier results', async () => {
    await page.evaluate(() => {
      location.hash = '#/';
    });
    await resultCard(page, photoName).waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
    const photo = fs.readFileSync(photoPath);
    await dropFiles(page, [
      { name: 'truncated.jpg', type: 'image/jpeg', bytes: photo.subarray(0, Math.floor(photo.length / 2)) },
      { name: 'notes.png', type: 'image/png', bytes: Buffer.from('These are notes, not a PNG image.\n') },
    ]);
    for (const name of ['truncated.jpg', 'notes.png']) {
      await page.locator('.alerts [role="alert"]', { hasText: name }).waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
    }

    // A file over the size limit is rejected before it is read.
    await page.evaluate(() => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([new Uint8Array(51 * 1024 * 1024)], 'huge.jpg', { type: 'image/jpeg' }));
      document.querySelector('.dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
    });
    const huge = page.locator('.alerts [role="alert"]', { hasText: 'huge.jpg' });
    await huge.waitFor();
    assert.match(await huge.textContent(), /50\.0 MB limit/);

    assert.equal(await resultCard(page, photoName).count(), 1, 'the photograph keeps its results');
    assert.equal(await page.locator('.image-result').count(), 1, 'no result for the bad files');
    assert.equal(await resultCard(page, photoName).locator('a.neuron-bar').count(), 60);
  });

  it('loads a model from ?model= and keeps it when another fails', async () => {
    // scripts/e2e.sh serves fixtures/models/ next to the site; hf-clip is a tiny CLIP in the
    // Hugging Face layout (4 blocks).
    const tab = await context.newPage();
    await tab.goto(new URL('?model=fixtures/models/hf-clip/', BASE_URL).href);
    await waitForModel(tab);
    const modelUrl = new URL('fixtures/models/hf-clip/', BASE_URL).href;
    assert.match(await tab.locator('#model').textContent(), new RegExp(`^${modelUrl}: `));
    assert.equal(await tab.locator('#model').getAttribute('data-blocks'), '4');

    const missingUrl = new URL('fixtures/models/missing/', BASE_URL).href;
    await tab.locator('.settings summary').click();
    await tab.locator('#model-url').fill('fixtures/models/missing/');
    await tab.locator('.model-form button[type="submit"]').click();
    const alert = tab.locator('.alerts [role="alert"]', { hasText: missingUrl });
    await alert.waitFor({ timeout: MODEL_TIMEOUT_MS });
    assert.match(await alert.textContent(), /none of config\.json, open_clip_config\.json was found/);
    assert.match(await alert.textContent(), /keeps using the previous model/);
    assert.match(await tab.locator('#model').textContent(), new RegExp(`^${modelUrl}: `));

    // The previous model still analyses images.
    await tab.setInputFiles('#file-input', photoPath);
    await resultCard(tab, photoName).waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
    await tab.close();
  });

  it('names a corrupted atlas file and keeps working without the atlas', async () => {
    const tab = await context.newPage();
    await tab.goto(new URL('clip-tokenizer.json', BASE_URL).href);
    await tab.evaluate(() => caches.delete('clip-lens-assets-v1'));
    await tab.route('**/atlas/block*/threshold.bin', async (route) => {
      const response = await route.fetch();
      const body = Buffer.from(await response.body());
      body[0] ^= 0xff;
      await route.fulfill({ response, body });
    });
    await tab.goto(BASE_URL);
    await tab.waitForFunction(() => document.body.dataset.backend !== undefined, null, { timeout: MODEL_TIMEOUT_MS });
    const alert = tab.locator('.alerts [role="alert"]', { hasText: 'threshold.bin' });
    await alert.waitFor({ timeout: MODEL_TIMEOUT_MS });
    assert.match(await alert.textContent(), /expected SHA-256/);
    await tab.waitForFunction(() => !document.querySelector('.progress'), null, { timeout: MODEL_TIMEOUT_MS });
    await tab.setInputFiles('#file-input', photoPath);
    await resultCard(tab, photoName).waitFor({ timeout: ANALYSIS_TIMEOUT_MS });
    assert.equal(await resultCard(tab, photoName).locator('a.neuron-bar').count(), 60, 'images are still analysed');
    await tab.close();
  });

  it('sends no image data over the network', () => {
    assert.ok(requests.length > 0, 'requests were recorded');
    const base = new URL(BASE_URL);
    for (const request of requests) {
      const url = new URL(request.url);
      if (url.protocol === 'data:' || url.protocol === 'blob:') {
        // Resolved inside the browser, without any network traffic.
        continue;
      }
      assert.equal(request.method, 'GET', `${request.url} is a GET`);
      assert.equal(request.bodyBytes, 0, `${request.url} carries no body`);
      assert.equal(url.host, base.host, `${request.url} goes to the test server only`);
    }
  });

  it('raised no uncaught error or panic', () => {
    assert.deepEqual(pageErrors, []);
  });
});
