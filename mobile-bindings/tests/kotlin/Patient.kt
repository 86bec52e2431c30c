// A patient app in Kotlin (JVM + JNA), run by tests/kotlin.rs against the built cdylib.
// Env: BEDSIDE_WS_URL, BEDSIDE_INVITE_CODE; -Djna.library.path points at the .so.
import uniffi.bedside_mobile.*
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.atomic.AtomicInteger
import kotlin.system.exitProcess

class Listener : ClientListener {
    val states = CopyOnWriteArrayList<CallStateFfi>()
    val frames = AtomicInteger(0)
    val audioFrames = AtomicInteger(0)
    val loudFrames = AtomicInteger(0)
    val chatReplies = CopyOnWriteArrayList<String>()
    override fun onState(state: CallStateFfi) { states.add(state) }
    override fun onSeated(participantId: String, role: RoleFfi) {}
    override fun onWaitingRoom(patients: List<WaitingPatientFfi>) {}
    override fun onPeer(participantId: String, event: PeerEventFfi) {}
    override fun onMicrophoneMuted(muted: Boolean) {}
    override fun onCameraEnabled(enabled: Boolean) {}
    override fun onAudioOnly(on: Boolean, manual: Boolean) {}
    override fun onRemoteVideoFrame(
        participantId: String, width: UInt, height: UInt,
        y: ByteArray, u: ByteArray, v: ByteArray, rotationDegrees: UShort,
    ) {
        check(y.size.toUInt() == width * height)
        frames.incrementAndGet()
    }
    override fun onRemoteAudio(samples: List<Short>) {
        check(samples.size == 960)
        audioFrames.incrementAndGet()
        // The doctor probe sends a tone: count the frames that carry sound.
        val rms = Math.sqrt(samples.sumOf { it.toDouble() * it.toDouble() } / samples.size)
        if (rms > 300.0) loudFrames.incrementAndGet()
    }
    override fun onStats(participantId: String, stats: StatsFfi) {}
    override fun onChat(participantId: String, text: String, outgoing: Boolean) {
        if (!outgoing) chatReplies.add(text)
    }
    override fun onChatNotDelivered(reason: String) { println("chat not delivered: $reason") }
    override fun onError(code: String, details: String) { println("error $code $details") }
}

fun waitFor(what: String, seconds: Int, predicate: () -> Boolean) {
    val deadline = System.currentTimeMillis() + seconds * 1000L
    while (System.currentTimeMillis() < deadline) {
        if (predicate()) return
        Thread.sleep(50)
    }
    System.err.println("timed out waiting for $what")
    exitProcess(1)
}

fun main() {
    val options = defaultClientOptions().apply {
        udpAddrs = listOf("127.0.0.1:0"); videoWidth = 320u; videoHeight = 180u; videoBitrateBps = 300_000u
    }
    try {
        BedsideClient("http://nope", options)
        error("a non-ws URL was accepted")
    } catch (e: BedsideException.InvalidArgument) {
        println("expected error: ${e.details}")
    }
    val client = BedsideClient(System.getenv("BEDSIDE_WS_URL"), options)
    val listener = Listener()
    val handle = client.setListener(listener)
    val running = java.util.concurrent.atomic.AtomicBoolean(true)
    val capture = Thread {
        val y = ByteArray(320 * 180) { (it % 200 + 16).toByte() }
        val c = ByteArray(160 * 90) { 0x80.toByte() }
        val samples = List(960) { (it * 37 % 2000 - 1000).toShort() }
        var n = 0
        while (running.get()) {
            if (n % 3 == 0) client.pushVideoFrame(320u, 180u, y, c, c, 0u)
            if (n % 2 == 0) client.pushAudioSamples(samples)
            n++
            Thread.sleep(10)
        }
    }
    capture.start()
    client.joinWithInvite(System.getenv("BEDSIDE_INVITE_CODE"), "Kotlin patient")
    waitFor("the waiting room", 15) { listener.states.contains(CallStateFfi.Waiting) }
    waitFor("being connected", 20) { listener.states.contains(CallStateFfi.Connected) }
    waitFor("more than 30 remote frames", 20) { listener.frames.get() > 30 }
    waitFor("the doctor's voice", 20) { listener.loudFrames.get() > 50 }
    client.sendChat("Hello from Kotlin")
    waitFor("the doctor's chat reply", 15) { listener.chatReplies.contains("echo: Hello from Kotlin") }
    client.switchCamera()
    client.appBackgrounded(true)
    client.appBackgrounded(false)
    val framesBefore = listener.frames.get()
    waitFor("video after switching cameras and the background", 20) { listener.frames.get() > framesBefore + 30 }
    client.leave()
    waitFor("the call to end", 10) { listener.states.contains(CallStateFfi.Ended(EndReasonFfi.Left)) }
    running.set(false)
    capture.join()
    handle.cancel()
    handle.destroy()
    client.destroy()
    println("states=${listener.states} frames=${listener.frames.get()} audio=${listener.audioFrames.get()} loud=${listener.loudFrames.get()}")
    println("KOTLIN PATIENT OK")
}
