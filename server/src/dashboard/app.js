// The Bedside operations dashboard. The administration key is asked for once and kept in this
// tab's sessionStorage only; the live feed is read with fetch() (so the key travels in an
// Authorization header, never in a URL) and parsed as server-sent events.
'use strict';

const KEY = 'bedside-admin-key';
const $ = (id) => document.getElementById(id);
let selected = null;
let last = null;
let controller = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('data-')) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svgEl(tag, attrs = {}) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function qualityBadge(q) {
  return el('span', { class: 'q q-' + (q || 'none'), 'data-quality': q || 'none' }, q || '—');
}

function num(v, unit, digits = 0) {
  if (v === null || v === undefined) return '—';
  return (v > 0 && v < 10 && digits === 0 ? v.toFixed(1) : v.toFixed(digits)) + unit;
}

function age(secs) {
  const m = Math.floor(secs / 60), s = secs % 60;
  return m > 0 ? `${m}m ${s}s` : `${s}s`;
}

function sparkline(rtt, loss) {
  const w = 120, h = 24;
  const svg = svgEl('svg', { class: 'spark', width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  const line = (values, max, cls) => {
    if (values.length < 2) return;
    const top = Math.max(max, ...values);
    const pts = values.map((v, i) => `${(i * w / (values.length - 1)).toFixed(1)},${(h - 1 - v * (h - 2) / top).toFixed(1)}`);
    svg.append(svgEl('polyline', { points: pts.join(' '), class: cls }));
  };
  line(rtt, 100, 'rtt');
  line(loss, 10, 'loss');
  return svg;
}

function tile(k, v) {
  return el('div', { class: 'tile' }, el('div', { class: 'v' }, v), el('div', { class: 'k' }, k));
}

function render(s) {
  if (!s.overview) return; // the server's first snapshot is not built yet
  last = s;
  const o = s.overview;
  const tiles = [
    tile('live consultations', o.consultations),
    tile('participants connected', o.participants_connected),
    tile('waiting', o.participants_waiting),
    tile('reconnecting', o.participants_reconnecting),
    tile('joins per minute', o.joins_per_minute),
    tile('calls good / fair / poor', `${o.calls_good} / ${o.calls_fair} / ${o.calls_poor}`),
  ];
  if (o.relay) {
    tiles.push(tile('relay allocations', `${o.relay.allocations} / ${o.relay.quota}`));
    tiles.push(tile('relay bandwidth', num(o.relay.kbps, ' kbps')));
  }
  if (o.region) tiles.unshift(tile('region · nodes', `${o.region} · ${o.nodes.length}`));
  $('overview').replaceChildren(...tiles);

  // A fleet: one line per live node (this dashboard's own node marked).
  const nodes = (o.nodes || []).map((n) => el('tr', { class: 'node', 'data-node': n.node },
    el('td', {}, n.node, n.node === o.node ? el('span', { class: 'hint' }, ' (this node)') : ''),
    el('td', {}, n.consultations),
    el('td', {}, n.participants_connected),
    el('td', {}, n.connections),
    el('td', {}, n.relay ? `${n.relay.allocations} / ${n.relay.quota}, ${num(n.relay.kbps, ' kbps')}` : '—'),
    el('td', {}, n.age_ms > 3000 ? `${Math.round(n.age_ms / 1000)} s ago` : 'live')));
  $('nodes').hidden = nodes.length === 0;
  $('node-rows').replaceChildren(...nodes);

  const alerts = s.alerts_firing.map((a) => el('div', { class: 'alert', 'data-alert': a.labels.alertname },
    el('strong', {}, a.labels.alertname), ' — ', a.summary));
  const resolved = s.alerts_history.filter((a) => a.status === 'resolved').slice(-3)
    .map((a) => el('div', { class: 'alert resolved' }, el('strong', {}, a.labels.alertname), ' resolved — ', a.summary));
  $('alerts').replaceChildren(...alerts, ...resolved);

  const rows = [];
  for (const c of s.consultations) {
    c.participants.forEach((p, i) => {
      const tr = el('tr', { class: 'call' + (i === 0 ? ' call-first' : ''), 'data-consultation': c.id });
      const first = i === 0;
      const roles = Object.entries(c.roles).map(([r, n]) => `${n} ${r}`).join(', ');
      tr.append(
        el('td', {}, first ? c.id : '', first ? el('div', { class: 'hint' }, c.node ? `${roles} · on ${c.node}` : roles) : ''),
        el('td', {}, first ? age(c.age_secs) : ''),
        el('td', { class: first ? 'call-quality' : '' }, first ? qualityBadge(c.quality) : ''),
        el('td', { 'data-participant': p.id }, `${p.role} `, el('span', { class: 'hint' }, p.id), ' ', qualityBadge(p.quality)),
        el('td', {}, p.state),
        el('td', { class: 'path' }, p.pair ? (p.transport ? `${p.pair} · ${p.transport.toUpperCase()}` : p.pair) : '—'),
        el('td', {}, num(p.rtt_ms, ' ms')),
        el('td', {}, `${num(p.loss_in_pct, '%', 1)} / ${num(p.loss_out_pct, '%', 1)}`),
        el('td', {}, p.width ? `${p.width}×${p.height} @ ${num(p.fps, '', 0)}` : '—'),
        el('td', {}, `${num(p.jitter_ms, ' ms')} / ${num(p.buffer_ms, ' ms')}`),
        el('td', {}, p.audio_only === null ? '—' : (p.audio_only ? 'yes' : 'no')),
        el('td', {}, sparkline(p.spark_rtt, p.spark_loss)),
      );
      tr.addEventListener('click', () => { selected = c.id; renderDetail(); });
      rows.push(tr);
    });
  }
  $('rows').replaceChildren(...rows);
  $('empty').hidden = s.consultations.length > 0;
  $('unlisted').hidden = !o.consultations_unlisted;
  $('unlisted').textContent = `${o.consultations_unlisted} more consultations are counted above but not listed (every other node lists at most 100 of its own, the worst first).`;
  renderDetail();
}

function describe(t) {
  switch (t.kind) {
    case 'media': return `media ${t.state}`;
    case 'path': return `path ${t.pair}`;
    case 'audio_only': return 'audio only';
    case 'video_back': return 'video back';
    case 'link_dropped': return 'link dropped';
    case 'resumed': return 'resumed';
    default: return t.kind;
  }
}

// A consultation's state transitions on a timeline: one lane per participant.
function renderDetail() {
  const d = $('detail');
  const c = last && last.consultations.find((x) => x.id === selected);
  if (!c) { d.hidden = true; return; }
  d.hidden = false;
  const w = Math.max(600, d.clientWidth - 40), lane = 60, h = 30 + lane * c.participants.length;
  const svg = svgEl('svg', { width: w, height: h });
  const t0 = last.at_ms - c.age_secs * 1000, span = Math.max(1, last.at_ms - t0);
  const x = (t) => 110 + (w - 120) * Math.min(1, Math.max(0, (t - t0) / span));
  c.participants.forEach((p, i) => {
    const y = 24 + i * lane;
    const label = svgEl('text', { x: 0, y: y + 4 }); label.textContent = `${p.role} ${p.id.slice(0, 8)}`;
    svg.append(label, svgEl('line', { x1: 110, x2: w - 10, y1: y, y2: y, stroke: '#cfd4da' }));
    let lastX = -1e9, stack = 0;
    for (const t of c.transitions.filter((t) => t.participant_id === p.id)) {
      const bad = ['link_dropped', 'audio_only'].includes(t.kind) || (t.kind === 'media' && t.state !== 'connected');
      const cx = x(t.at_ms);
      // Labels of changes close in time are stacked rather than drawn over each other.
      stack = cx - lastX < 90 ? stack + 1 : 0;
      lastX = cx;
      svg.append(svgEl('circle', { cx, cy: y, r: 5, fill: bad ? '#d8453b' : '#2e9d4f' }));
      const tx = svgEl('text', { x: cx + 6, y: y + 16 + 12 * (stack % 3) }); tx.textContent = describe(t);
      svg.append(tx);
    }
  });
  d.replaceChildren(el('h2', {}, `Consultation ${c.id}`), svg,
    el('p', { class: 'hint' }, 'Timeline since the consultation started; click another row to switch.'));
}

async function connect(key) {
  if (controller) controller.abort();
  controller = new AbortController();
  $('status').textContent = 'connecting…';
  let res;
  try {
    res = await fetch('/dashboard/events', { headers: { Authorization: 'Bearer ' + key }, signal: controller.signal, cache: 'no-store' });
  } catch (e) {
    $('status').textContent = 'offline, retrying';
    setTimeout(() => connect(key), 2000);
    return;
  }
  if (res.status === 401) {
    sessionStorage.removeItem(KEY);
    showLogin('That key was refused.');
    return;
  }
  showMain();
  $('status').textContent = 'live';
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (data) {
          render(JSON.parse(data));
          $('status').textContent = 'live · ' + new Date().toLocaleTimeString();
        }
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') return;
  }
  $('status').textContent = 'disconnected, retrying';
  setTimeout(() => connect(key), 2000);
}

function showLogin(error) {
  $('main').hidden = true; $('logout').hidden = true; $('login').hidden = false;
  $('login-error').textContent = error || '';
  $('status').textContent = 'not connected';
}

function showMain() {
  $('login').hidden = true; $('main').hidden = false; $('logout').hidden = false;
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const key = $('key').value.trim();
  $('key').value = '';
  sessionStorage.setItem(KEY, key);
  connect(key);
});
$('logout').addEventListener('click', () => {
  if (controller) controller.abort();
  sessionStorage.removeItem(KEY);
  showLogin();
});

const saved = sessionStorage.getItem(KEY);
if (saved) connect(saved); else showLogin();
