// SAMPLE ONLY: not compiled or run in this repository (no Xcode or Swift toolchain here). It
// shows the whole patient flow against the generated Swift bindings (module bedside_mobile,
// shipped in BedsideMobile.xcframework); camera and rendering code is outlined, not complete.
import AVFoundation
import UIKit
import os

final class ConsultationViewController: UIViewController {
    private var client: BedsideClient?
    private var listenerHandle: ListenerHandle?
    private let inviteCode: String

    init(inviteCode: String) {
        self.inviteCode = inviteCode
        super.init(nibName: nil, bundle: nil)
    }
    required init?(coder: NSCoder) { fatalError("not used") }

    override func viewDidLoad() {
        super.viewDidLoad()
        try? setLogSink(sink: OSLogSink(), maxLevel: .info)

        var options = defaultClientOptions()
        options.videoWidth = 640; options.videoHeight = 360; options.videoBitrateBps = 600_000
        do {
            let client = try BedsideClient(serverUrl: "wss://clinic.example/ws", options: options)
            self.client = client
            // Keep the handle: releasing it, or cancel(), stops the events.
            listenerHandle = client.setListener(listener: Listener(owner: self))
            client.joinWithInvite(code: inviteCode, displayName: "Alex")
            startCapture(client)
        } catch BedsideError.InvalidArgument(let details) {
            show("Bad clinic address: \(details)")
        } catch {
            show("Cannot start: \(error)")
        }
        NotificationCenter.default.addObserver(
            forName: UIApplication.didEnterBackgroundNotification, object: nil, queue: .main
        ) { [weak self] _ in self?.client?.appBackgrounded(backgrounded: true) }
        NotificationCenter.default.addObserver(
            forName: UIApplication.willEnterForegroundNotification, object: nil, queue: .main
        ) { [weak self] _ in self?.client?.appBackgrounded(backgrounded: false) }
    }

    /// Callbacks come on Bedside threads: hop to the main queue for UIKit.
    final class Listener: ClientListener, @unchecked Sendable {
        weak var owner: ConsultationViewController?
        init(owner: ConsultationViewController) { self.owner = owner }

        func onState(state: CallStateFfi) {
            DispatchQueue.main.async { [weak owner] in
                switch state {
                case .waiting: owner?.show("The doctor will let you in shortly")
                case .waitingForPeers, .connecting: owner?.show("Admitted")
                case .connected: owner?.show(nil)
                case .reconnecting: owner?.show("Reconnecting...")
                case .ended(let reason): owner?.show("Call ended: \(reason)"); owner?.stopCapture()
                default: break
                }
            }
        }
        func onSeated(participantId: String, role: RoleFfi) {}
        func onWaitingRoom(patients: [WaitingPatientFfi]) {}
        func onPeer(participantId: String, event: PeerEventFfi) {}
        func onMicrophoneMuted(muted: Bool) {}
        func onCameraEnabled(enabled: Bool) {}
        func onAudioOnly(on: Bool, manual: Bool) {}
        func onRemoteVideoFrame(participantId: String, width: UInt32, height: UInt32,
                                y: Data, u: Data, v: Data, rotationDegrees: UInt16) {
            // Wrap the planes in a CVPixelBuffer (or Metal textures) and draw rotated.
        }
        func onRemoteAudio(samples: [Int16]) {
            // 20 ms of 48 kHz mono, everyone mixed: copy into an AVAudioPCMBuffer and schedule
            // it on an AVAudioPlayerNode (voice-processing I/O gives the platform's echo canceller).
        }
        func onStats(participantId: String, stats: StatsFfi) {}
        // Chat is end to end and stored nowhere: keep it in memory only.
        func onChat(participantId: String, text: String, outgoing: Bool) {
            DispatchQueue.main.async { self.owner?.appendChat(outgoing ? "You: \(text)" : "Doctor: \(text)") }
        }
        func onChatNotDelivered(reason: String) {
            DispatchQueue.main.async { self.owner?.appendChat("Not sent: \(reason)") }
        }
        func onError(code: String, details: String) { Logger().warning("\(code): \(details)") }
    }

    final class OSLogSink: LogSink {
        private let log = Logger(subsystem: "health.bedside", category: "core")
        func log(level: LogLevel, target: String, message: String) {
            log.log(level: (level == .error || level == .warn) ? .error : .info, "\(target): \(message)")
        }
    }

    private func startCapture(_ client: BedsideClient) {
        // AVCaptureVideoDataOutput with kCVPixelFormatType_420YpCbCr8Planar (I420), copy the
        // planes tightly packed, then:
        //   try client.pushVideoFrame(width: w, height: h, y: y, u: u, v: v, rotationDegrees: 90)
        // AVAudioEngine input tap converted to 48 kHz mono Int16, 960 samples at a time:
        //   try client.pushAudioSamples(samples: samples)
    }

    func stopCapture() { /* stop the AVCaptureSession and AVAudioEngine */ }

    @objc func muteTapped(_ sender: UISwitch) { client?.setMuted(muted: sender.isOn) }
    @objc func cameraTapped(_ sender: UISwitch) { client?.setCameraEnabled(enabled: sender.isOn) }
    // From NWPathMonitor's pathUpdateHandler:
    func pathChanged() { client?.networkChanged() }

    @objc func leaveTapped() {
        client?.leave()
    }

    deinit {
        listenerHandle?.cancel()
    }

    private func show(_ text: String?) { /* banner */ }
    /// The chat transcript lives in a text view only; it is never written to storage.
    func appendChat(_ line: String) { /* chatView.text += line + "\n" */ }
    func sendChatTapped(_ text: String) {
        do { try client?.sendChat(text: text) } catch { show("Message not sent: \(error)") }
    }
}
