// Drives /dashboard in headless Chromium (playwright-core, pointed at the system's Chromium)
// for tests/tests/dashboard.rs. Input from the environment; prints one JSON object.
//   BASE_URL, ADMIN_KEY, EXPECT_ROWS, SCREENSHOT, CHROMIUM, PROFILE_DIR (a new temporary
//   directory), PLAYWRIGHT (the playwright-core module's path)
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT);
const expectRows = Number(process.env.EXPECT_ROWS || '2');
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

// A fresh profile in the given temporary directory.
const context = await chromium.launchPersistentContext(process.env.PROFILE_DIR, {
  executablePath: process.env.CHROMIUM, args, viewport: { width: 1400, height: 640 },
});
const out = {};
try {
  const page = await context.newPage();
  await page.goto(process.env.BASE_URL + '/dashboard');
  await page.fill('#key', process.env.ADMIN_KEY);
  await page.click('#login button[type=submit]');
  // The live consultations, each scored, exactly one poor (on a loaded machine a healthy
  // call's first seconds can read slow too: wait for them to pass).
  await page.waitForFunction((n) => {
    const q = [...document.querySelectorAll('tr.call-first')]
      .map((r) => r.querySelector('.call-quality [data-quality]')?.dataset.quality);
    return q.length === n && q.every((x) => x && x !== 'none') && q.filter((x) => x === 'poor').length === 1;
  }, expectRows, { timeout: 40000, polling: 250 });
  const rows = () => page.$$eval('tr.call-first', (trs) => trs.map((r) => ({
    id: r.dataset.consultation,
    quality: r.querySelector('.call-quality [data-quality]').dataset.quality,
    text: r.innerText,
  })));
  out.rows = await rows();
  // Live: a new snapshot is rendered without reloading (the status line carries its time).
  const before = await page.textContent('#status');
  const t0 = Date.now();
  await page.waitForFunction((b) => document.getElementById('status').textContent !== b, before, { timeout: 5000, polling: 100 });
  out.update_ms = Date.now() - t0;
  // Open the first call's detail (its timeline).
  await page.click('tr.call-first');
  await page.waitForSelector('#detail svg circle', { timeout: 5000 });
  out.timeline_points = await page.$$eval('#detail svg circle', (c) => c.length);
  await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  out.session_key_kept = await page.evaluate(() => sessionStorage.getItem('bedside-admin-key') !== null);
  out.local_storage_items = await page.evaluate(() => localStorage.length);
  out.html = await page.content();
} finally {
  await context.close();
}
process.stdout.write(JSON.stringify(out));
