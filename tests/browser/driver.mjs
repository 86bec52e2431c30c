// Drives the join page in headless Chromium (the system's /usr/bin/chromium, with its fake
// camera and microphone) for tests/tests/browser.rs. One scenario per run, given as JSON in
// argv[2]; it prints one JSON object per line on stdout: {"event": ...} as the call goes, then
// {"result": ...} with what the page measured (getStats: frames decoded, audio energy, the
// candidate type), and exits 0, or prints {"error": ...} and exits 1. Every wait is bounded.
//
// Scenario fields: url, chromium, userDataDir, name, clinician (joins with the #token in the
// url and is admitted at once), admit (click Admit when someone waits), chat (a line to send; the probe answers
// "echo: <line>"), screenshot (a path), reload (reload mid-call and check the seat resumes),
// networkChange (offline and back: ICE must restart), outage (the test restarts the server after "ready-for-outage": the seat must resume),
// audioOnly (the other side or the network goes audio-only and back: the page must say so, then
// show video again), home (Chromium's HOME: its NSS database trusts the test's private CA; no
// certificate error is ever ignored), minFrames, holdMs, timeoutMs.
import { createRequire } from 'node:module';

const require = createRequire(process.env.BEDSIDE_NODE_MODULES + '/');
const { chromium } = require('playwright-core');

const s = JSON.parse(process.argv[2]);
const timeout = s.timeoutMs || 20000;
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const started = Date.now();
const ms = () => Date.now() - started;

const browser = await chromium.launch({
  executablePath: s.chromium,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
  ],
  headless: true,
  // Chromium on Linux trusts what $HOME/.pki/nssdb trusts: the tests put their CA there.
  env: s.home ? { ...process.env, HOME: s.home } : process.env,
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 960, height: 720 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });

  const test = () => page.evaluate(() => window.bedsideTest);
  const waitFor = async (what, pred) => {
    const until = Date.now() + timeout;
    for (;;) {
      const t = await test().catch(() => null);
      if (t && pred(t)) return t;
      if (Date.now() > until) throw new Error('timed out waiting for ' + what + ': ' + JSON.stringify(t));
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  const stat = (t, key) => Object.values(t.stats || {}).reduce((a, x) => a + (x[key] || 0), 0);
  // Video decoded, and the other side's audio heard (the page's analyser on the remote track).
  const media = (t, minFrames) => t.state === 'call' && stat(t, 'framesDecoded') >= minFrames &&
    t.remoteAudio && t.remoteAudio.level > 0.01;

  const resp = await page.goto(s.url);
  out({ event: 'page', status: resp.status(), csp: resp.headers()['content-security-policy'] || null, ms: ms() });
  await page.fill('#name', s.name);
  if (!s.clinician) {
    await page.click('#join');
    await waitFor('the waiting room', (t) => t.state === 'waiting' || t.state === 'call');
    out({ event: 'waiting', ms: ms(), text: (await page.textContent('#waiting h1')) });
  } else {
    await page.click('#join');
    await waitFor('admission', (t) => t.state === 'call');
    out({ event: 'admitted', ms: ms() });
  }
  if (s.admit) {
    await page.waitForSelector('#waiting-list .admit', { timeout });
    out({ event: 'someone-waits', ms: ms() });
    await page.click('#waiting-list .admit');
  }
  const minFrames = s.minFrames || 20;
  let t = await waitFor('media both ways', (t) => media(t, minFrames));
  out({ event: 'media', ms: ms(), stats: t.stats });
  let chatEchoed = null;
  if (s.chat) {
    await page.fill('#chat-text', s.chat);
    await page.click('#chat-form button');
    t = await waitFor('the chat echo', (t) => t.chatReceived.includes('echo: ' + s.chat));
    chatEchoed = t.chatReceived;
    out({ event: 'chat', ms: ms() });
  }
  let afterNetworkChange = null;
  if (s.networkChange) {
    // The browser goes offline and back: the page restarts ICE (asks for it as the answerer).
    const frames = stat(t, 'framesDecoded');
    await context.setOffline(true);
    await new Promise((r) => setTimeout(r, 300));
    await context.setOffline(false);
    t = await waitFor('media after the network change', (t) => t.events.includes('network:online') &&
      t.remoteUfrags.length >= 2 && t.state === 'call' && stat(t, 'framesDecoded') >= frames + minFrames);
    afterNetworkChange = { framesBefore: frames, framesAfter: stat(t, 'framesDecoded'), remoteUfrags: t.remoteUfrags.length };
    out({ event: 'network-changed', ms: ms() });
  }
  let afterOutage = null;
  if (s.outage) {
    // The test takes the server away now; the page must resume its seat, the media going on.
    const frames = stat(t, 'framesDecoded');
    out({ event: 'ready-for-outage', ms: ms() });
    t = await waitFor('the seat resumed', (t) => t.resumed && t.sawReconnecting && t.state === 'call' &&
      stat(t, 'framesDecoded') >= frames + minFrames);
    afterOutage = { framesBefore: frames, framesAfter: stat(t, 'framesDecoded'), events: t.events };
    out({ event: 'resumed', ms: ms() });
  }
  let audioOnly = null;
  if (s.audioOnly) {
    // Audio-only and back: the notice in plain words while the video stalls (and, when the
    // page itself stops its video, while it sends none) and the sound goes on; then video again.
    const figures = (t) => ({ frames: stat(t, 'framesDecoded'), audio: stat(t, 'audioPackets'),
      framesSent: stat(t, 'framesSent') });
    t = await waitFor('the audio-only notice', (t) => t.audioOnly === true);
    const banner = (await page.isVisible('#banner')) ? await page.textContent('#banner') : null;
    const at = figures(t);
    out({ event: 'audio-only', ms: ms(), banner, by: t.audioOnlyBy });
    await new Promise((r) => setTimeout(r, s.audioOnlyHoldMs || 2000));
    t = await test();
    const during = { ...figures(t), still: t.audioOnly === true };
    out({ event: 'audio-only-held', ms: ms() });
    t = await waitFor('video back after audio-only', (t) => t.audioOnly === false &&
      stat(t, 'framesDecoded') >= during.frames + minFrames &&
      (!s.audioOnlyBySelf || stat(t, 'framesSent') >= during.framesSent + minFrames));
    const after = figures(t);
    const bannerAfter = (await page.isVisible('#banner')) ? await page.textContent('#banner') : null;
    audioOnly = { banner, by: t.audioOnlyBy, at, during, after, bannerAfter };
    out({ event: 'video-back', ms: ms() });
  }
  if (s.screenshot) {
    await page.screenshot({ path: s.screenshot });
  }
  let afterReload = null;
  if (s.reload) {
    const before = Object.keys(t.stats);
    await page.reload();
    out({ event: 'reloaded', ms: ms() });
    t = await waitFor('media after the reload', (t) => t.resumed && media(t, minFrames));
    afterReload = { peers: Object.keys(t.stats), before, events: t.events };
    out({ event: 'resumed', ms: ms() });
  }
  if (s.holdMs) await new Promise((r) => setTimeout(r, s.holdMs));
  t = await test();
  out({ result: { state: t.state, stats: t.stats, remoteAudio: t.remoteAudio, chatReceived: chatEchoed, resumed: t.resumed,
    afterReload, afterOutage, afterNetworkChange, audioOnly, sawReconnecting: Boolean(t.sawReconnecting), events: t.events, errors } });
  if (s.leave) {
    await page.click('#leave');
    await waitFor('the end screen', (t) => t.state === 'ended');
  }
} catch (e) {
  failed = true;
  out({ error: String(e && e.stack || e) });
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
