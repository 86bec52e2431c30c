// Bedside join page: a patient (or, with #token=..., a clinician) joins a consultation from a
// browser. Plain JavaScript, no build step, served by bedside-server with a strict CSP (no inline
// code, no other origin). It speaks the signaling protocol of bedside-protocol (JSON on /ws) and,
// on each peer connection's data channel, the chat protocol of bedside_protocol::chat (label
// "bedside-chat", negotiated as SCTP stream 0 on both sides, one JSON object per message).
//
// Who offers: the participant admitted later offers to everyone listed in its `admitted`; the
// others answer. Continuity as in the native client: ICE restart when the connection fails or
// the network changes (the offerer restarts, the answerer asks with `ice_restart`), the signaling
// link resumed with the resume token (kept in sessionStorage, the only thing this page stores, so
// a reload inside the rejoin window takes the same seat back without a new admission).
//
// Test-only query parameters: `relay=1` forces relay candidates (iceTransportPolicy "relay"),
// `relay=udp|tcp|tls` also keeps only the TURN servers of that transport; `tone=<Hz>` sends a
// sine of that frequency instead of the microphone.
'use strict';

(() => {
  const PROTOCOL_VERSION = 1;
  const CHAT_LABEL = 'bedside-chat';
  const CHAT_ID = 0;
  const MAX_CHAT_BYTES = 4096;
  const RESUME_KEY = 'bedside.resume';
  const PING_EVERY_MS = 2000;
  const SILENT_LINK_MS = 6000;
  const DISCONNECTED_GRACE_MS = 2000;
  const RESTART_TIMEOUT_MS = 8000;

  const params = new URLSearchParams(location.search);
  const RELAY = params.get('relay');
  const FORCE_RELAY = Boolean(RELAY);
  const TEST_TONE_HZ = Number(params.get('tone')) || 0;

  const $ = (id) => document.getElementById(id);
  const SCREENS = ['blocked', 'lobby', 'waiting', 'call', 'ended'];

  const state = {
    auth: null, // {kind: 'invite_code', code} or {kind: 'token', token}
    name: '',
    ws: null,
    wsGeneration: 0,
    lastHeard: 0,
    pingNonce: 0,
    timers: [],
    me: null,
    role: null,
    admitted: false,
    joinedOnce: false,
    leaving: false,
    reconnectSince: 0,
    rejoinWindowMs: 60000,
    iceServers: [],
    peers: new Map(), // id -> {pc, dc, offerer, info, remote, restartTimer, graceTimer}
    local: null, // MediaStream sent
    micStream: null,
    toneContext: null,
    meter: null,
    muted: false,
    cameraOff: false,
    audioOnlyByNetwork: false,
    chatId: 0,
    test: { state: 'lobby', chatReceived: [], chatSent: 0, stats: {}, resumed: false, events: [], remoteUfrags: [] },
  };
  // What the browser tests read (no personal data: figures and states only).
  window.bedsideTest = state.test;

  function show(screen) {
    for (const s of SCREENS) $(s).hidden = s !== screen;
    state.test.state = screen;
  }

  function note(el, text) {
    el.textContent = text || '';
    el.hidden = !text;
  }

  function event(what) {
    state.test.events.push(what);
  }

  // ---- Start -------------------------------------------------------------------------------

  function start() {
    if (!window.isSecureContext || !navigator.mediaDevices) {
      note($('blocked-reason'), 'Open this link over HTTPS (it starts with https://). The camera ' +
        'and microphone only work on a secure page.');
      show('blocked');
      return;
    }
    const match = location.pathname.match(/^\/j\/([A-Za-z0-9-]{1,32})$/);
    const hash = new URLSearchParams(location.hash.slice(1));
    if (hash.get('token')) {
      state.auth = { kind: 'token', token: hash.get('token') };
      // Keep the token out of the address bar and the history.
      history.replaceState(null, '', location.pathname + location.search);
    } else if (match) {
      state.auth = { kind: 'invite_code', code: match[1] };
    } else {
      $('code-row').hidden = false;
      $('code').required = true;
    }
    $('join-form').addEventListener('submit', onJoinClicked);
    $('camera').addEventListener('change', () => openMedia());
    $('microphone').addEventListener('change', () => openMedia());
    $('leave').addEventListener('click', leave);
    $('leave-waiting').addEventListener('click', leave);
    $('mute').addEventListener('click', toggleMute);
    $('camera-off').addEventListener('click', toggleCamera);
    $('chat-form').addEventListener('submit', onChatSubmit);
    window.addEventListener('online', () => networkChanged('online'));
    if (navigator.connection && navigator.connection.addEventListener) {
      navigator.connection.addEventListener('change', () => networkChanged('connection change'));
    }
    const resume = sessionStorage.getItem(RESUME_KEY);
    if (resume) {
      // A reload (or a return to the tab) inside the rejoin window: take the seat back.
      show('waiting');
      note($('waiting-link'), 'Reconnecting to your consultation…');
      openMedia().then(() => connect());
      return;
    }
    show('lobby');
    openMedia();
  }

  // ---- Camera, microphone, level meter -------------------------------------------------------

  async function openMedia() {
    const cameraId = $('camera').value;
    const micId = $('microphone').value;
    const constraints = {
      video: { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 30 } },
      audio: TEST_TONE_HZ ? false : { echoCancellation: true, noiseSuppression: true },
    };
    if (cameraId) constraints.video.deviceId = { exact: cameraId };
    if (micId && constraints.audio) constraints.audio.deviceId = { exact: micId };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia(constraints);
      note($('media-note'), '');
    } catch (e) {
      // No camera (or it was refused): try the microphone alone, the call can be audio only.
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: false, audio: constraints.audio || true });
        note($('media-note'), 'No camera could be opened: the doctor will hear you but not see you.');
      } catch (e2) {
        stream = new MediaStream();
        note($('media-note'), 'The camera and microphone could not be opened. Allow them in the ' +
          'browser (the icon beside the address) and reload the page.');
      }
    }
    if (TEST_TONE_HZ) {
      if (!state.toneContext) {
        state.toneContext = new AudioContext();
        const osc = state.toneContext.createOscillator();
        osc.frequency.value = TEST_TONE_HZ;
        const gain = state.toneContext.createGain();
        gain.gain.value = 0.3;
        const dest = state.toneContext.createMediaStreamDestination();
        osc.connect(gain).connect(dest);
        osc.start();
        state.toneTrack = dest.stream.getAudioTracks()[0];
      }
      stream.addTrack(state.toneTrack);
    }
    const old = state.local;
    state.local = stream;
    applyMuteAndCamera();
    $('preview').srcObject = stream;
    $('self').srcObject = stream;
    startMeter(stream);
    // Swap the tracks in every call without renegotiating.
    for (const p of state.peers.values()) {
      for (const sender of p.pc.getSenders()) {
        const kind = sender.track ? sender.track.kind : null;
        const next = kind ? stream.getTracks().find((t) => t.kind === kind) : null;
        if (next) sender.replaceTrack(next).catch(() => {});
      }
    }
    if (old) for (const t of old.getTracks()) if (t !== state.toneTrack && !stream.getTracks().includes(t)) t.stop();
    await listDevices();
  }

  async function listDevices() {
    const devices = await navigator.mediaDevices.enumerateDevices();
    const fill = (select, kind, current) => {
      const chosen = select.value || current;
      select.replaceChildren();
      for (const d of devices.filter((d) => d.kind === kind)) {
        const o = document.createElement('option');
        o.value = d.deviceId;
        o.textContent = d.label || (kind === 'videoinput' ? 'Camera' : 'Microphone');
        select.append(o);
      }
      if (chosen) select.value = chosen;
    };
    const track = (kind) => state.local && state.local.getTracks().find((t) => t.kind === kind);
    const setting = (kind) => { const t = track(kind); return t && t.getSettings().deviceId; };
    fill($('camera'), 'videoinput', setting('video'));
    fill($('microphone'), 'audioinput', setting('audio'));
  }

  function startMeter(stream) {
    const audio = stream.getAudioTracks()[0];
    if (!audio) return;
    if (!state.meter) {
      const ctx = new AudioContext();
      state.meter = { ctx, analyser: ctx.createAnalyser(), source: null };
      state.meter.analyser.fftSize = 512;
      const buf = new Float32Array(state.meter.analyser.fftSize);
      const tick = () => {
        state.meter.analyser.getFloatTimeDomainData(buf);
        let sum = 0;
        for (const v of buf) sum += v * v;
        const rms = Math.sqrt(sum / buf.length);
        const level = Math.min(1, rms * 4);
        $('level').value = level;
        state.test.micLevel = level;
        requestAnimationFrame(tick);
      };
      requestAnimationFrame(tick);
    }
    if (state.meter.source) state.meter.source.disconnect();
    state.meter.source = state.meter.ctx.createMediaStreamSource(new MediaStream([audio]));
    state.meter.source.connect(state.meter.analyser);
    state.meter.ctx.resume().catch(() => {});
  }

  // The level and the loudest frequency of what we hear (shown nowhere; the tests read it).
  function watchRemoteAudio(track) {
    const ctx = state.meter ? state.meter.ctx : new AudioContext();
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 4096;
    ctx.createMediaStreamSource(new MediaStream([track])).connect(analyser);
    const time = new Float32Array(analyser.fftSize);
    const freq = new Float32Array(analyser.frequencyBinCount);
    const timer = setInterval(() => {
      if (track.readyState === 'ended') return clearInterval(timer);
      analyser.getFloatTimeDomainData(time);
      let sum = 0;
      for (const v of time) sum += v * v;
      analyser.getFloatFrequencyData(freq);
      let peak = 0;
      for (let i = 1; i < freq.length; i++) if (freq[i] > freq[peak]) peak = i;
      state.test.remoteAudio = { level: Math.sqrt(sum / time.length), peakHz: (peak * ctx.sampleRate) / analyser.fftSize };
    }, 250);
  }

  function applyMuteAndCamera() {
    if (!state.local) return;
    for (const t of state.local.getAudioTracks()) t.enabled = !state.muted;
    for (const t of state.local.getVideoTracks()) t.enabled = !state.cameraOff;
  }

  function toggleMute() {
    state.muted = !state.muted;
    $('mute').textContent = state.muted ? 'Unmute' : 'Mute';
    $('mute').setAttribute('aria-pressed', String(state.muted));
    applyMuteAndCamera();
  }

  function toggleCamera() {
    state.cameraOff = !state.cameraOff;
    $('camera-off').textContent = state.cameraOff ? 'Camera on' : 'Camera off';
    $('camera-off').setAttribute('aria-pressed', String(state.cameraOff));
    applyMuteAndCamera();
  }

  // ---- Signaling ---------------------------------------------------------------------------

  function onJoinClicked(e) {
    e.preventDefault();
    state.name = $('name').value.trim();
    if (!state.auth) {
      const code = $('code').value.trim().toUpperCase();
      if (!/^[A-Z0-9-]{4,32}$/.test(code)) {
        note($('lobby-note'), 'That code does not look right: it is the 10 letters and digits ' +
          'in your invitation, like K7QM4-XPR2D.');
        return;
      }
      state.auth = { kind: 'invite_code', code };
    }
    if (state.toneContext) state.toneContext.resume().catch(() => {});
    if (state.meter) state.meter.ctx.resume().catch(() => {});
    $('join').disabled = true;
    note($('lobby-note'), 'Connecting…');
    connect();
  }

  function wsUrl() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  }

  function send(msg) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  function connect() {
    clearInterval(state.pingTimer);
    const generation = ++state.wsGeneration;
    const ws = new WebSocket(wsUrl());
    state.ws = ws;
    ws.onopen = () => {
      if (generation !== state.wsGeneration) return;
      state.lastHeard = Date.now();
      const resume = sessionStorage.getItem(RESUME_KEY);
      if (resume) {
        send({ type: 'resume', protocol_version: PROTOCOL_VERSION, resume_token: resume });
      } else if (state.auth) {
        const join = { type: 'join', protocol_version: PROTOCOL_VERSION, auth: state.auth };
        if (state.name) join.display_name = state.name;
        send(join);
      } else {
        // A reload whose seat was given up: start again from the lobby.
        show('lobby');
        ws.close();
        return;
      }
      state.pingTimer = setInterval(() => {
        if (Date.now() - state.lastHeard > SILENT_LINK_MS) {
          ws.close();
          return;
        }
        send({ type: 'ping', nonce: ++state.pingNonce });
      }, PING_EVERY_MS);
    };
    ws.onmessage = (m) => {
      if (generation !== state.wsGeneration) return;
      state.lastHeard = Date.now();
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch (e) {
        return;
      }
      if (msg && typeof msg.type === 'string') onMessage(msg).catch((e) => console.warn(msg.type, e));
    };
    ws.onclose = (c) => {
      if (generation !== state.wsGeneration) return;
      clearInterval(state.pingTimer);
      onLinkClosed(c.code);
    };
  }

  function onLinkClosed(code) {
    if (state.leaving || state.test.state === 'ended') return;
    if (code === 4003) return endCall('The doctor could not see you now.', 'You were not admitted');
    if (code === 4005) return endCall('The doctor has ended the consultation.');
    if (code === 4004) return endCall('This consultation was opened in another tab or window.', 'Opened elsewhere');
    const hasSeat = sessionStorage.getItem(RESUME_KEY);
    if (!hasSeat) {
      if (state.test.state === 'lobby') {
        note($('lobby-note'), 'The clinic could not be reached. Check your connection and try again.');
        $('join').disabled = false;
      }
      return;
    }
    // Keep the seat: resume with backoff (full jitter) until the rejoin window is over.
    if (!state.reconnectSince) state.reconnectSince = Date.now();
    setBanner('Reconnecting…');
    if (Date.now() - state.reconnectSince > state.rejoinWindowMs) {
      sessionStorage.removeItem(RESUME_KEY);
      return endCall('The connection to the clinic was lost. Open the link again to rejoin.', 'Connection lost');
    }
    const attempt = Math.min(5, (state.reconnectAttempts = (state.reconnectAttempts || 0) + 1));
    const delay = Math.random() * Math.min(8000, 500 * 2 ** attempt);
    setTimeout(connect, delay);
  }

  async function onMessage(msg) {
    switch (msg.type) {
      case 'joined':
        state.me = msg.participant_id;
        state.role = msg.role;
        state.rejoinWindowMs = (msg.rejoin_window_secs || 60) * 1000;
        state.reconnectSince = 0;
        state.reconnectAttempts = 0;
        state.joinedOnce = true;
        if (msg.resumed) {
          state.test.resumed = true;
          event('resumed');
        } else {
          closeAllPeers();
        }
        sessionStorage.setItem(RESUME_KEY, msg.resume_token);
        if (!state.admitted) {
          show('waiting');
          note($('waiting-link'), '');
        }
        setBanner('');
        break;
      case 'waiting':
        state.admitted = false;
        show('waiting');
        break;
      case 'admitted':
        state.admitted = true;
        state.iceServers = msg.ice_servers || [];
        show('call');
        $('waiting-room').hidden = !canAdmit();
        onAdmitted(msg.peers || []);
        break;
      case 'denied':
        sessionStorage.removeItem(RESUME_KEY);
        endCall('The doctor could not see you now.', 'You were not admitted');
        break;
      case 'waiting_room':
        showWaitingRoom(msg.waiting || []);
        break;
      case 'peer_joined':
        peerInfo(msg.peer);
        break;
      case 'peer_left':
        closePeer(msg.participant_id);
        updateRemoteNote();
        break;
      case 'peer_reconnecting':
        setBanner(peerLabel(msg.participant_id) + '’s connection dropped: reconnecting…');
        break;
      case 'peer_back':
        setBanner('');
        break;
      case 'offer': {
        const p = peer(msg.from) || createPeer(msg.from, false);
        if (p.pc.signalingState !== 'stable' && p.offerer) {
          // Glare during a restart: the answerer's side wins, ours is rolled back.
          await p.pc.setLocalDescription({ type: 'rollback' });
        }
        await p.pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
        const ufrag = (msg.sdp.match(/a=ice-ufrag:(\S+)/) || [])[1];
        if (ufrag && !state.test.remoteUfrags.includes(ufrag)) state.test.remoteUfrags.push(ufrag);
        await p.pc.setLocalDescription();
        send({ type: 'answer', to: msg.from, sdp: p.pc.localDescription.sdp });
        break;
      }
      case 'answer': {
        const p = peer(msg.from);
        if (p && p.pc.signalingState === 'have-local-offer') {
          await p.pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
        }
        break;
      }
      case 'ice_candidate': {
        const p = peer(msg.from);
        const c = msg.candidate || {};
        if (p && c.candidate) {
          await p.pc.addIceCandidate({
            candidate: c.candidate,
            sdpMid: c.sdp_mid ?? null,
            sdpMLineIndex: c.sdp_mline_index ?? null,
            usernameFragment: c.username_fragment ?? null,
          }).catch((e) => console.warn('candidate', e));
        }
        break;
      }
      case 'ice_restart': {
        const p = peer(msg.from);
        if (p && p.offerer) restartIce(msg.from);
        break;
      }
      case 'ice_servers':
        state.iceServers = msg.ice_servers || [];
        for (const p of state.peers.values()) p.pc.setConfiguration(pcConfig());
        break;
      case 'ended':
        sessionStorage.removeItem(RESUME_KEY);
        endCall('The doctor has ended the consultation.');
        break;
      case 'error':
        onError(msg);
        break;
      case 'redirect':
        followRedirect(msg);
        break;
      case 'ping':
        send({ type: 'pong', nonce: msg.nonce });
        break;
      default:
        break; // pong, and types a newer server may add
    }
  }

  // The consultation belongs to another region of the fleet (its invite code or token says
  // which): open that region's join page with the same code or token. The page's own origin is
  // the only one it may connect to, so it moves rather than opening a socket elsewhere.
  function followRedirect(msg) {
    const base = typeof msg.web_url === 'string' ? msg.web_url.replace(/\/+$/, '') : '';
    if (!/^https?:\/\/\S+$/.test(base) || !state.auth) return; // the error that follows says why
    state.wsGeneration++; // nothing more from this link
    state.leaving = true;
    sessionStorage.removeItem(RESUME_KEY);
    note($('lobby-note'), 'Taking you to your clinic\'s server…');
    if (state.auth.kind === 'invite_code') {
      location.replace(base + '/j/' + encodeURIComponent(state.auth.code));
    } else {
      location.replace(base + '/j#token=' + encodeURIComponent(state.auth.token));
    }
  }

  function onError(msg) {
    switch (msg.code) {
      case 'resume_expired':
        // The seat is gone (the window passed, or the consultation ended): join afresh if we
        // can, else back to the lobby.
        sessionStorage.removeItem(RESUME_KEY);
        closeAllPeers();
        state.admitted = false;
        if (state.auth) {
          const join = { type: 'join', protocol_version: PROTOCOL_VERSION, auth: state.auth };
          if (state.name) join.display_name = state.name;
          send(join);
        } else {
          show('lobby');
          note($('lobby-note'), 'Your place was not kept. Type your name and join again.');
          if (!location.pathname.match(/^\/j\/[A-Za-z0-9-]+$/)) $('code-row').hidden = false;
        }
        break;
      case 'invalid_invite_code':
      case 'consultation_not_found':
        state.auth = state.auth && state.auth.kind === 'token' ? state.auth : null;
        lobbyError('This consultation link is not valid any more (it may have expired). Ask the ' +
          'clinic for a new one.');
        break;
      case 'invalid_token':
      case 'token_expired':
        lobbyError('This sign-in link has expired. Ask the clinic for a new one.');
        break;
      case 'rate_limited':
        lobbyError('Too many attempts. Wait a minute and try again.');
        break;
      case 'consultation_full':
        lobbyError('This consultation is full.');
        break;
      default:
        console.warn('server error', msg.code);
    }
  }

  function lobbyError(text) {
    if (state.admitted || state.test.state === 'waiting') return;
    state.ws && state.ws.close();
    show('lobby');
    if (!state.auth) $('code-row').hidden = false;
    note($('lobby-note'), text);
    $('join').disabled = false;
  }

  function canAdmit() {
    return state.role === 'doctor' || state.role === 'clinician';
  }

  function showWaitingRoom(waiting) {
    const list = $('waiting-list');
    list.replaceChildren();
    for (const w of waiting) {
      const li = document.createElement('li');
      const name = document.createElement('span');
      name.textContent = (w.display_name || 'A patient') + (w.connected ? '' : ' (reconnecting)');
      const admit = document.createElement('button');
      admit.type = 'button';
      admit.textContent = 'Admit';
      admit.className = 'admit';
      admit.addEventListener('click', () => send({ type: 'admit', participant_id: w.participant_id }));
      const deny = document.createElement('button');
      deny.type = 'button';
      deny.className = 'secondary';
      deny.textContent = 'Not now';
      deny.addEventListener('click', () => send({ type: 'deny', participant_id: w.participant_id }));
      li.append(name, admit, deny);
      list.append(li);
    }
    $('waiting-room').hidden = !canAdmit() || waiting.length === 0;
    state.test.waiting = waiting.length;
  }

  // ---- Peer connections ----------------------------------------------------------------------

  function peer(id) {
    return state.peers.get(id);
  }

  function peerInfo(info) {
    state.peerInfo = state.peerInfo || new Map();
    state.peerInfo.set(info.participant_id, info);
  }

  function peerLabel(id) {
    const info = state.peerInfo && state.peerInfo.get(id);
    if (info && info.role === 'doctor') return 'The doctor';
    return (info && info.display_name) || 'The other side';
  }

  function onAdmitted(peers) {
    const listed = new Set(peers.map((p) => p.participant_id));
    for (const id of [...state.peers.keys()]) if (!listed.has(id)) closePeer(id);
    for (const info of peers) {
      peerInfo(info);
      const p = peer(info.participant_id);
      if (!p) {
        // We were admitted after everyone listed: we offer to each.
        createPeer(info.participant_id, true);
      } else if (p.pc.connectionState !== 'connected') {
        restartIce(info.participant_id);
      }
    }
    updateRemoteNote();
  }

  // With `relay=<transport>`, only the TURN URLs of that transport.
  function urlWanted(url) {
    if (!RELAY || RELAY === '1') return true;
    if (RELAY === 'tls') return url.startsWith('turns:');
    if (!url.startsWith('turn:')) return false;
    return url.includes('transport=' + RELAY) || (RELAY === 'udp' && !url.includes('transport='));
  }

  function pcConfig() {
    return {
      iceServers: state.iceServers.map((s) => {
        const urls = (Array.isArray(s.urls) ? s.urls : [s.urls]).filter(urlWanted);
        return { ...s, urls };
      }).filter((s) => s.urls.length).map((s) => {
        const server = { urls: s.urls };
        if (s.username) server.username = s.username;
        if (s.credential) server.credential = s.credential;
        return server;
      }),
      iceTransportPolicy: FORCE_RELAY ? 'relay' : 'all',
      bundlePolicy: 'max-bundle',
    };
  }

  function createPeer(id, offerer) {
    const pc = new RTCPeerConnection(pcConfig());
    const p = { pc, dc: null, offerer, remote: new MediaStream(), restartTimer: 0, graceTimer: 0, framesAt: null };
    state.peers.set(id, p);
    // Audio then video, like the native client; both are sent and received.
    const tracks = state.local ? state.local.getTracks() : [];
    for (const kind of ['audio', 'video']) {
      const t = tracks.find((x) => x.kind === kind);
      if (t) pc.addTrack(t, state.local);
      else pc.addTransceiver(kind, { direction: 'recvonly' });
    }
    const dc = pc.createDataChannel(CHAT_LABEL, { negotiated: true, id: CHAT_ID });
    p.dc = dc;
    dc.onmessage = (m) => onChatMessage(id, m.data);
    pc.onicecandidate = (e) => {
      const c = e.candidate;
      const candidate = c
        ? { candidate: c.candidate, sdp_mid: c.sdpMid, sdp_mline_index: c.sdpMLineIndex, username_fragment: c.usernameFragment }
        : { candidate: '' };
      for (const k of Object.keys(candidate)) if (candidate[k] === null) delete candidate[k];
      send({ type: 'ice_candidate', to: id, candidate });
    };
    pc.ontrack = (e) => {
      p.remote.addTrack(e.track);
      $('remote').srcObject = p.remote;
      if (e.track.kind === 'audio') watchRemoteAudio(e.track);
    };
    pc.onnegotiationneeded = async () => {
      if (!p.offerer) return;
      try {
        await pc.setLocalDescription();
        send({ type: 'offer', to: id, sdp: pc.localDescription.sdp });
      } catch (e) {
        console.warn('offer', e);
      }
    };
    pc.onconnectionstatechange = () => onConnectionState(id);
    return p;
  }

  function onConnectionState(id) {
    const p = peer(id);
    if (!p) return;
    const s = p.pc.connectionState;
    event('pc:' + s);
    clearTimeout(p.graceTimer);
    if (s === 'connected') {
      clearTimeout(p.restartTimer);
      p.restartTimer = 0;
      setBanner('');
    } else if (s === 'failed') {
      setBanner('Reconnecting…');
      restartIce(id);
    } else if (s === 'disconnected') {
      setBanner('Reconnecting…');
      p.graceTimer = setTimeout(() => {
        if (p.pc.connectionState === 'disconnected') restartIce(id);
      }, DISCONNECTED_GRACE_MS);
    }
    updateIndicator();
  }

  function restartIce(id) {
    const p = peer(id);
    if (!p || !state.admitted) return;
    event('ice_restart');
    if (p.offerer) p.pc.restartIce(); // fires negotiationneeded: a new offer with new credentials
    else send({ type: 'ice_restart', to: id });
    clearTimeout(p.restartTimer);
    p.restartTimer = setTimeout(() => {
      if (p.pc.connectionState !== 'connected') restartIce(id);
    }, RESTART_TIMEOUT_MS);
  }

  // The browser fires several of these for one change (connection change, online): one
  // restart for a burst.
  function networkChanged(why) {
    event('network:' + why);
    clearTimeout(state.networkTimer);
    state.networkTimer = setTimeout(() => {
      if (!state.ws || state.ws.readyState > WebSocket.OPEN) {
        if (sessionStorage.getItem(RESUME_KEY)) connect();
      }
      for (const id of state.peers.keys()) restartIce(id);
    }, 300);
  }

  function closePeer(id) {
    const p = peer(id);
    if (!p) return;
    clearTimeout(p.restartTimer);
    clearTimeout(p.graceTimer);
    p.pc.close();
    state.peers.delete(id);
  }

  function closeAllPeers() {
    for (const id of [...state.peers.keys()]) closePeer(id);
  }

  function updateRemoteNote() {
    const text = state.peers.size === 0 ? 'Waiting for the doctor to join…' : '';
    note($('remote-note'), text);
  }

  function setBanner(text) {
    note($('banner'), text);
    if (text.startsWith('Reconnecting')) state.test.sawReconnecting = true;
  }

  // ---- Chat ----------------------------------------------------------------------------------

  function utf8Length(text) {
    return new TextEncoder().encode(text).length;
  }

  function chatLine(text, cls) {
    const li = document.createElement('li');
    li.textContent = text;
    if (cls) li.className = cls;
    $('chat-log').append(li);
    $('chat-log').scrollTop = $('chat-log').scrollHeight;
  }

  function onChatSubmit(e) {
    e.preventDefault();
    const input = $('chat-text');
    const text = input.value;
    if (!text.trim()) return;
    if (utf8Length(text) > MAX_CHAT_BYTES) {
      chatLine('The message is too long (at most ' + MAX_CHAT_BYTES + ' bytes).', 'failed');
      return;
    }
    const msg = JSON.stringify({ type: 'chat', id: ++state.chatId, text });
    let sent = 0;
    for (const p of state.peers.values()) {
      if (p.dc && p.dc.readyState === 'open') {
        p.dc.send(msg);
        sent++;
      }
    }
    if (sent) {
      chatLine('You: ' + text, 'mine');
      state.test.chatSent++;
      input.value = '';
    } else {
      chatLine('Not delivered (nobody is connected yet): ' + text, 'failed');
    }
  }

  function onChatMessage(from, data) {
    // The same checks as bedside_protocol::chat::PeerMessage::decode: what is not a readable
    // chat line within the limits is dropped.
    if (typeof data !== 'string' || data.length > 2 * MAX_CHAT_BYTES + 256) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (!msg || msg.type !== 'chat' || typeof msg.text !== 'string') return;
    if (!msg.text.trim() || utf8Length(msg.text) > MAX_CHAT_BYTES) return;
    chatLine(peerLabel(from) + ': ' + msg.text);
    state.test.chatReceived.push(msg.text);
  }

  // ---- Statistics, indicator, audio-only -----------------------------------------------------

  async function readStats() {
    const all = {};
    for (const [id, p] of state.peers) {
      const s = { framesDecoded: 0, audioLevel: 0, audioEnergy: 0, audioPackets: 0, framesSent: 0 };
      const report = await p.pc.getStats();
      let pairId = null;
      const byId = new Map();
      report.forEach((r) => byId.set(r.id, r));
      report.forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') {
          s.framesDecoded += r.framesDecoded || 0;
          s.frameWidth = r.frameWidth;
          s.frameHeight = r.frameHeight;
        } else if (r.type === 'inbound-rtp' && r.kind === 'audio') {
          s.audioLevel = Math.max(s.audioLevel, r.audioLevel || 0);
          s.audioEnergy += r.totalAudioEnergy || 0;
          s.audioPackets += r.packetsReceived || 0;
          s.packetsLost = (s.packetsLost || 0) + (r.packetsLost || 0);
        } else if (r.type === 'outbound-rtp' && r.kind === 'video') {
          s.framesSent += r.framesSent || 0;
        } else if (r.type === 'transport' && r.selectedCandidatePairId) {
          pairId = r.selectedCandidatePairId;
        } else if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded' && !pairId) {
          pairId = r.id;
        }
      });
      const pair = pairId && byId.get(pairId);
      if (pair) {
        const local = byId.get(pair.localCandidateId);
        s.rttMs = pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : undefined;
        s.availableOutgoingKbps = pair.availableOutgoingBitrate ? pair.availableOutgoingBitrate / 1000 : undefined;
        if (local) {
          s.localCandidateType = local.candidateType;
          s.relayProtocol = local.relayProtocol;
        }
        const remote = byId.get(pair.remoteCandidateId);
        if (remote) s.remoteCandidateType = remote.candidateType;
      }
      s.connectionState = p.pc.connectionState;
      // Remote video stalled while the audio flows: the other side (or the network) went
      // audio-only.
      const now = Date.now();
      if (!p.framesAt || s.framesDecoded !== p.framesAt.frames) p.framesAt = { frames: s.framesDecoded, at: now };
      s.remoteVideoStalled = p.pc.connectionState === 'connected' && now - p.framesAt.at > 2500;
      all[id] = s;
      adaptToNetwork(p, s).catch(() => {});
    }
    state.test.stats = all;
    updateIndicator();
  }

  // Audio-only when the network asks for it: after three seconds in a row below 80 kbps
  // available we stop sending video (the camera stays open for the self view). With only the
  // sound on the wire the browser's estimate cannot see the link recover, so, like the native
  // client's quality ladder, the page probes: after 3 s (doubling per failed probe, up to 30 s)
  // the video goes out again, at most 300 kbps, for 6 s; if the estimate passes 250 kbps the
  // video stays on. Above that, the browser's own encoder scales the picture down.
  const NETWORK_LOW_KBPS = 80;
  const NETWORK_BACK_KBPS = 250;
  const PROBE_KBPS = 300;
  const PROBE_MS = 6000;
  const PROBE_FIRST_MS = 3000;
  const PROBE_MAX_WAIT_MS = 30000;
  async function adaptToNetwork(p, s) {
    if (s.availableOutgoingKbps === undefined) return;
    const now = Date.now();
    const n = p.net || (p.net = { lowFor: 0, off: false, wait: PROBE_FIRST_MS, probeAt: 0, probeUntil: 0 });
    if (!n.off) {
      n.lowFor = s.availableOutgoingKbps < NETWORK_LOW_KBPS ? n.lowFor + 1 : 0;
      if (n.lowFor >= 3) {
        n.off = true;
        n.wait = PROBE_FIRST_MS;
        n.probeAt = now + n.wait;
        event('audio-only:network');
        await sendVideo(p, false);
      }
    } else if (n.probeUntil) {
      if (s.availableOutgoingKbps > NETWORK_BACK_KBPS) {
        n.off = false;
        n.lowFor = 0;
        n.probeUntil = 0;
        event('video:network');
        await sendVideo(p, true);
      } else if (now >= n.probeUntil) {
        n.probeUntil = 0;
        n.wait = Math.min(PROBE_MAX_WAIT_MS, n.wait * 2);
        n.probeAt = now + n.wait;
        await sendVideo(p, false);
      }
    } else if (now >= n.probeAt) {
      n.probeUntil = now + PROBE_MS;
      await sendVideo(p, true, PROBE_KBPS);
    }
    state.audioOnlyByNetwork = [...state.peers.values()].some((q) => q.net && q.net.off);
  }

  // Turns the video sent to `p` on (capped at `maxKbps` when given) or off, without
  // renegotiating.
  async function sendVideo(p, on, maxKbps) {
    for (const sender of p.pc.getSenders()) {
      if (!sender.track || sender.track.kind !== 'video') continue;
      const params = sender.getParameters();
      for (const e of params.encodings || []) {
        e.active = on;
        if (maxKbps) e.maxBitrate = maxKbps * 1000;
        else delete e.maxBitrate;
      }
      await sender.setParameters(params).catch(() => {});
    }
  }

  function updateIndicator() {
    const el = $('indicator');
    const stats = Object.values(state.test.stats);
    const states = [...state.peers.values()].map((p) => p.pc.connectionState);
    let level = 'none';
    let text = state.peers.size ? 'Connecting…' : 'Waiting for the doctor';
    if (states.includes('connected')) {
      const s = stats[0] || {};
      const rtt = s.rttMs || 0;
      level = rtt > 400 ? 'poor' : rtt > 150 ? 'fair' : 'good';
      text = { good: 'Good connection', fair: 'Fair connection', poor: 'Poor connection' }[level];
      if (s.localCandidateType === 'relay') text += ' (relayed)';
      const stalled = Object.keys(state.test.stats).find((id) => state.test.stats[id].remoteVideoStalled);
      if (state.audioOnlyByNetwork || stalled) {
        const info = stalled && state.peerInfo && state.peerInfo.get(stalled);
        const whose = info && info.role === 'doctor' ? 'the doctor’s' : 'the other side’s';
        setBanner(state.audioOnlyByNetwork
          ? 'Audio only: your connection is too weak for video. You can still talk.'
          : 'Audio only: ' + whose + ' video is paused. You can still talk.');
        state.test.audioOnly = true;
        state.test.audioOnlyBy = state.audioOnlyByNetwork ? 'network' : 'remote';
      } else if ($('banner').textContent.startsWith('Audio only')) {
        setBanner('');
        state.test.audioOnly = false;
      }
    } else if (states.some((s) => s === 'disconnected' || s === 'failed')) {
      level = 'poor';
      text = 'Reconnecting…';
    }
    el.dataset.level = level;
    el.textContent = text;
  }

  setInterval(() => { readStats().catch((e) => { state.test.statsError = String(e); }); }, 1000);

  // ---- Leaving -------------------------------------------------------------------------------

  function leave() {
    state.leaving = true;
    send({ type: 'leave' });
    sessionStorage.removeItem(RESUME_KEY);
    closeAllPeers();
    endCall('You left the consultation. You can close this page.', 'You left');
    setTimeout(() => state.ws && state.ws.close(), 200);
  }

  function endCall(reason, title) {
    closeAllPeers();
    clearInterval(state.pingTimer);
    if (state.local) for (const t of state.local.getTracks()) t.stop();
    $('ended-title').textContent = title || 'The consultation has ended';
    note($('ended-reason'), reason);
    show('ended');
  }

  start();
})();
