"""A patient app in Python, run by tests/python.rs against the built libbedside_mobile.so.

Env: BEDSIDE_BINDINGS_DIR (holds bedside_mobile.py and the .so), BEDSIDE_WS_URL,
BEDSIDE_INVITE_CODE. Joins with the invite code, pushes synthetic I420 video and audio,
waits to be admitted by the doctor (a probe), receives its video, leaves. Exit 0 on success.
"""

import math
import os
import sys
import threading
import time

sys.path.insert(0, os.environ["BEDSIDE_BINDINGS_DIR"])
import bedside_mobile as bm  # noqa: E402

WIDTH, HEIGHT = 320, 180
DOCTOR_TONE_HZ, PATIENT_TONE_HZ = 440, 660


def goertzel_power(samples, hz, rate=48_000):
    coeff = 2 * math.cos(2 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def tone_of(samples):
    """Which participant tone dominates 20 ms of audio, if it is loud enough to be one."""
    if sum(x * x for x in samples) / len(samples) < 100 * 100:
        return None
    return max((DOCTOR_TONE_HZ, PATIENT_TONE_HZ), key=lambda hz: goertzel_power(samples, hz))


class Listener(bm.ClientListener):
    def __init__(self):
        self.lock = threading.Lock()
        self.states = []
        self.peers = []
        self.frames = 0
        self.sizes = set()
        self.stats = 0
        self.errors = []
        self.seated = None
        self.audio_frames = 0
        self.doctor_tone_frames = 0
        self.chat = []
        self.chat_not_delivered = []

    def on_state(self, state):
        with self.lock:
            self.states.append(state)

    def on_seated(self, participant_id, role):
        self.seated = (participant_id, role)

    def on_waiting_room(self, patients):
        pass

    def on_peer(self, participant_id, event):
        with self.lock:
            self.peers.append((participant_id, event))

    def on_microphone_muted(self, muted):
        pass

    def on_camera_enabled(self, enabled):
        pass

    def on_audio_only(self, on, manual):
        pass

    def on_remote_video_frame(self, participant_id, width, height, y, u, v, rotation_degrees):
        assert len(y) == width * height, (len(y), width, height)
        assert len(u) == len(v) == (width // 2) * (height // 2)
        assert rotation_degrees in (0, 90, 180, 270)
        with self.lock:
            self.frames += 1
            self.sizes.add((width, height))

    def on_remote_audio(self, samples):
        assert len(samples) == 960, len(samples)
        with self.lock:
            self.audio_frames += 1
            if tone_of(samples) == DOCTOR_TONE_HZ:
                self.doctor_tone_frames += 1

    def on_stats(self, participant_id, stats):
        with self.lock:
            self.stats += 1

    def on_chat(self, participant_id, text, outgoing):
        with self.lock:
            self.chat.append((participant_id, text, outgoing))

    def on_chat_not_delivered(self, reason):
        with self.lock:
            self.chat_not_delivered.append(reason)

    def on_error(self, code, details):
        with self.lock:
            self.errors.append((code, details))


class Sink(bm.LogSink):
    def __init__(self):
        self.lines = []

    def log(self, level, target, message):
        self.lines.append((level, target, message))


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def main():
    sink = Sink()
    bm.set_log_sink(sink, bm.LogLevel.INFO)

    options = bm.default_client_options()
    options.udp_addrs = ["127.0.0.1:0"]
    options.video_width, options.video_height = WIDTH, HEIGHT
    options.video_bitrate_bps = 300_000

    # Errors are the one BedsideError enum with stable cases.
    try:
        bm.BedsideClient("http://not-a-websocket", options)
        raise AssertionError("a non-ws URL was accepted")
    except bm.BedsideError.InvalidArgument as e:
        print("expected error:", e)

    client = bm.BedsideClient(os.environ["BEDSIDE_WS_URL"], options)
    try:
        client.push_audio_samples([0] * 959)
        raise AssertionError("959 samples were accepted")
    except bm.BedsideError.InvalidArgument:
        pass
    try:
        client.push_video_frame(4, 4, b"\0" * 16, b"\0" * 4, b"\0" * 4, 45)
        raise AssertionError("a 45 degree rotation was accepted")
    except bm.BedsideError.InvalidArgument:
        pass

    listener = Listener()
    handle = client.set_listener(listener)
    client.app_backgrounded(False)

    stop = threading.Event()

    def capture():
        n = 0
        chroma = b"\x80" * ((WIDTH // 2) * (HEIGHT // 2))
        next_video = next_audio = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_video:
                luma = bytes(((x + n * 4) % 220) + 16 for x in range(WIDTH)) * HEIGHT
                client.push_video_frame(WIDTH, HEIGHT, luma, chroma, chroma, 90 if n % 2 else 0)
                n += 1
                next_video += 1 / 30
            if now >= next_audio:
                client.push_audio_samples([(i * 37 % 2000) - 1000 for i in range(960)])
                next_audio += 0.02
            time.sleep(0.003)

    threading.Thread(target=capture, daemon=True).start()

    client.join_with_invite(os.environ["BEDSIDE_INVITE_CODE"], "Python patient")
    wait_for("the waiting room", lambda: bm.CallStateFfi.WAITING() in listener.states, 15)
    wait_for("being connected", lambda: bm.CallStateFfi.CONNECTED() in listener.states, 20)
    try:
        wait_for("more than 30 remote frames", lambda: listener.frames > 30, 20)
    except AssertionError:
        print(f"frames={listener.frames} peers={listener.peers} stats={listener.stats}")
        raise
    # The doctor's voice (the probe's 440 Hz tone) comes out decoded, for the player.
    wait_for("the doctor's tone", lambda: listener.doctor_tone_frames > 50, 20)
    # Chat goes end to end over the data channel: the doctor (the probe) echoes it back.
    try:
        client.send_chat("   ")
        raise AssertionError("blank chat was accepted")
    except bm.BedsideError.InvalidArgument:
        pass
    client.send_chat("Hello doctor, I can see you")
    wait_for("the doctor's reply", lambda: any(
        not out and text == "echo: Hello doctor, I can see you" for _, text, out in listener.chat), 15)
    assert any(out for _, _, out in listener.chat), listener.chat
    assert not listener.chat_not_delivered, listener.chat_not_delivered
    # Switching cameras and a trip to the background keep the call and its video.
    client.switch_camera()
    client.app_backgrounded(True)
    client.app_backgrounded(False)
    frames_before = listener.frames
    wait_for("video after the switch", lambda: listener.frames > frames_before + 30, 20)
    client.set_muted(True)
    client.network_changed()

    client.leave()
    ended = bm.CallStateFfi.ENDED(bm.EndReasonFfi.LEFT())
    wait_for("the call to end", lambda: ended in listener.states, 10)
    stop.set()

    handle.cancel()
    frames_after_cancel = listener.frames
    time.sleep(0.1)
    assert listener.frames == frames_after_cancel

    assert listener.seated is not None and listener.seated[1] == bm.RoleFfi.PATIENT, listener.seated
    # The doctor was there before us: client-core reports it through PeerMedia (no PeerJoined).
    assert any(isinstance(e, bm.PeerEventFfi.MEDIA) for _, e in listener.peers), listener.peers
    for w, h in listener.sizes:
        assert 0 < w <= 1280 and 0 < h <= 720 and w % 2 == 0 and h % 2 == 0, listener.sizes
    assert not listener.errors, listener.errors
    assert any(t.startswith("bedside_mobile") for _, t, _ in sink.lines), sink.lines[:5]

    print(f"states={listener.states}")
    print(f"frames={listener.frames} sizes={sorted(listener.sizes)} stats={listener.stats} "
          f"audio_frames={listener.audio_frames} doctor_tone={listener.doctor_tone_frames} "
          f"chat={len(listener.chat)} "
          f"log_lines={len(sink.lines)}")
    print("PYTHON PATIENT OK")


if __name__ == "__main__":
    main()
