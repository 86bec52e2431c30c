// SAMPLE ONLY: not compiled or run in this repository (no Android SDK/NDK here). It shows the
// whole patient flow against the generated bindings (package uniffi.bedside_mobile); camera
// (CameraX) and rendering code is outlined, not complete.
package health.bedside.sample

import android.app.Activity
import android.os.Bundle
import android.util.Log
import android.widget.Toast
import uniffi.bedside_mobile.*

class MainActivity : Activity() {
    private var client: BedsideClient? = null
    private var listenerHandle: ListenerHandle? = null
    /** An AudioTrack (48 kHz, mono, PCM 16, MODE_STREAM) created with the call; outlined. */
    private var player: android.media.AudioTrack? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)

        // Bedside's log lines into Logcat (webrtc-rs stays silent: its lines name addresses).
        setLogSink(object : LogSink {
            override fun log(level: LogLevel, target: String, message: String) {
                Log.println(if (level <= LogLevel.WARN) Log.WARN else Log.INFO, "Bedside", "$target: $message")
            }
        }, LogLevel.INFO)

        val inviteCode = intent.data?.getQueryParameter("code") ?: return finish()
        val options = defaultClientOptions().apply {
            videoWidth = 640u; videoHeight = 360u; videoBitrateBps = 600_000u
        }
        val c = try {
            BedsideClient("wss://clinic.example/ws", options)
        } catch (e: BedsideException) {
            Log.e("Bedside", "cannot start: $e"); return finish()
        }
        client = c
        // Keep the handle: dropping (garbage-collecting) it, or cancel(), stops the events.
        listenerHandle = c.setListener(Listener())
        c.joinWithInvite(inviteCode, "Alex")
        startCapture(c)
    }

    /** Callbacks come on Bedside threads: hop to the UI thread for views. */
    inner class Listener : ClientListener {
        override fun onState(state: CallStateFfi) = runOnUiThread {
            when (state) {
                is CallStateFfi.Waiting -> showBanner("The doctor will let you in shortly")
                is CallStateFfi.Connecting, is CallStateFfi.WaitingForPeers -> showBanner("Admitted")
                is CallStateFfi.Connected -> hideBanner()
                is CallStateFfi.Reconnecting -> showBanner("Reconnecting...")
                is CallStateFfi.Ended -> { showBanner("Call ended: ${state.reason}"); stopCapture() }
                else -> {}
            }
        }
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
            // Upload the I420 planes to a GL texture (or convert) and draw rotated.
            remoteView.render(width.toInt(), height.toInt(), y, u, v, rotationDegrees.toInt())
        }
        /** 20 ms of 48 kHz mono, everyone mixed: write it to an AudioTrack in streaming mode
         *  (USAGE_VOICE_COMMUNICATION, so the platform's echo canceller sees it). */
        override fun onRemoteAudio(samples: List<Short>) {
            player?.write(samples.toShortArray(), 0, samples.size)
        }
        override fun onStats(participantId: String, stats: StatsFfi) {}
        // Chat is end to end and stored nowhere: keep it in the activity's memory only.
        override fun onChat(participantId: String, text: String, outgoing: Boolean) = runOnUiThread {
            chatLog.append(if (outgoing) "You: $text\n" else "Doctor: $text\n")
        }
        override fun onChatNotDelivered(reason: String) = runOnUiThread {
            Toast.makeText(this@MainActivity, "Not sent: $reason", Toast.LENGTH_SHORT).show()
        }
        override fun onError(code: String, details: String) { Log.w("Bedside", "$code: $details") }
    }

    private fun startCapture(c: BedsideClient) {
        // CameraX ImageAnalysis (YUV_420_888): copy the planes tightly packed, then
        //   c.pushVideoFrame(w.toUInt(), h.toUInt(), y, u, v, imageInfo.rotationDegrees.toUShort())
        // AudioRecord at 48 kHz mono PCM 16: read 960 samples at a time, then
        //   c.pushAudioSamples(samples.toList())
    }

    private fun stopCapture() { /* unbind CameraX, stop AudioRecord */ }

    fun onMuteClicked(muted: Boolean) = client?.setMuted(muted)
    fun onCameraClicked(on: Boolean) = client?.setCameraEnabled(on)
    fun onAudioOnlyClicked(on: Boolean) = client?.setAudioOnly(on)
    fun onSendChatClicked(text: String) = try {
        client?.sendChat(text)
    } catch (e: BedsideException.InvalidArgument) {
        Toast.makeText(this, "Message not sent: ${e.details}", Toast.LENGTH_SHORT).show()
    }
    // From ConnectivityManager.NetworkCallback.onAvailable / onLost:
    fun onNetworkChanged() = client?.networkChanged()

    override fun onStop() { super.onStop(); client?.appBackgrounded(true) }
    override fun onStart() { super.onStart(); client?.appBackgrounded(false) }

    override fun onDestroy() {
        client?.leave()
        listenerHandle?.cancel()
        client?.destroy()   // frees the Rust object (also happens on GC)
        client = null
        super.onDestroy()
    }

    // Outline helpers.
    private val remoteView = object { fun render(w: Int, h: Int, y: ByteArray, u: ByteArray, v: ByteArray, r: Int) {} }
    private fun showBanner(text: String) {}
    private fun hideBanner() {}
    private val chatLog = StringBuilder()   // shown in a TextView; never written to storage
}
