//! H.264 round trips with the marked test pattern: markers survive, keyframes on request,
//! bitrate and resolution changes take effect, corrupt input is an error.

use bedside_client_core::media::{
    FrameMarker, H264Config, H264Decoder, H264Encoder, MediaError, PatternConfig,
    TestPatternSource, VideoFrame, contains_idr, read_marker,
};

const FRAME_US: u64 = 33_333;

fn source(tag: u8) -> TestPatternSource {
    TestPatternSource::new(PatternConfig {
        tag,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn markers_survive_720p_at_1_5_mbps() {
    markers_survive(1_500_000);
}

#[test]
fn markers_survive_720p_at_1_mbps() {
    markers_survive(1_000_000);
}

fn markers_survive(bitrate_bps: u32) {
    let mut src = source(0x42);
    let mut enc = H264Encoder::new(H264Config {
        bitrate_bps,
        ..Default::default()
    })
    .unwrap();
    let mut dec = H264Decoder::new().unwrap();
    assert!(dec.needs_keyframe());
    let mut bytes = 0usize;
    let mut decoded = 0u32;
    for i in 0..60u32 {
        let capture_us = 5_000_000 + u64::from(i) * FRAME_US;
        let frame = src.next_frame(capture_us);
        let Some(au) = enc.encode(&frame).unwrap() else {
            panic!("frame {i} skipped by rate control");
        };
        assert_eq!(au.keyframe, i == 0, "frame {i}");
        bytes += au.data.len();
        let out = dec
            .decode(&au.data, au.capture_us)
            .unwrap()
            .expect("a picture");
        assert_eq!((out.width(), out.height()), (1280, 720));
        assert_eq!(out.capture_us, capture_us);
        assert_eq!(
            read_marker(&out),
            Some(FrameMarker {
                counter: i,
                capture_us,
                tag: 0x42
            }),
            "frame {i}"
        );
        decoded += 1;
    }
    assert_eq!(decoded, 60);
    assert!(!dec.needs_keyframe());
    let kbps = bytes as f64 * 8.0 / 2.0 / 1000.0;
    eprintln!("60 frames at 30 fps, target {bitrate_bps}: {kbps:.0} kbps");
    assert!(
        kbps < f64::from(bitrate_bps) / 1000.0 * 1.3,
        "rate control far off: {kbps:.0} kbps"
    );
}

#[test]
fn keyframe_on_request() {
    let mut src = source(1);
    let mut enc = H264Encoder::new(H264Config {
        width: 640,
        height: 360,
        bitrate_bps: 600_000,
        ..Default::default()
    })
    .unwrap();
    let mut kinds = vec![];
    for i in 0..20u64 {
        if i == 10 {
            enc.request_keyframe();
        }
        let au = enc.encode(&src.next_frame(i * FRAME_US)).unwrap().unwrap();
        assert_eq!(au.keyframe, contains_idr(&au.data));
        kinds.push(au.keyframe);
    }
    let idrs: Vec<usize> = (0..20).filter(|&i| kinds[i]).collect();
    assert_eq!(idrs, vec![0, 10]);
}

#[test]
fn bitrate_change_takes_effect() {
    let mut src = source(2);
    let mut enc = H264Encoder::new(H264Config {
        bitrate_bps: 1_500_000,
        ..Default::default()
    })
    .unwrap();
    // Bytes per frame slot (a frame skipped by rate control counts as 0 bytes).
    let mut sizes = vec![];
    for i in 0..150u64 {
        if i == 60 {
            enc.set_bitrate(400_000).unwrap();
        }
        let au = enc.encode(&src.next_frame(i * FRAME_US)).unwrap();
        sizes.push(au.map_or(0, |a| a.data.len()));
    }
    let avg = |r: std::ops::Range<usize>| sizes[r.clone()].iter().sum::<usize>() / r.len();
    let (high, low) = (avg(30..60), avg(90..150));
    eprintln!("bytes/frame: {high} at 1.5 Mbps, {low} at 400 kbps");
    // 1.5 Mbps at 30 fps = 6250 bytes/frame, 400 kbps = 1667.
    assert!((5_000..7_500).contains(&high), "high {high}");
    assert!((800..2_300).contains(&low), "low {low}");
    assert_eq!(enc.config().bitrate_bps, 400_000);

    // And back up.
    enc.set_bitrate(1_500_000).unwrap();
    let mut up = vec![];
    for i in 150..240u64 {
        let au = enc.encode(&src.next_frame(i * FRAME_US)).unwrap();
        up.push(au.map_or(0, |a| a.data.len()));
    }
    let up_avg: usize = up[30..].iter().sum::<usize>() / 60;
    eprintln!("bytes/frame back at 1.5 Mbps: {up_avg}");
    assert!(up_avg > low * 2, "up {up_avg} low {low}");
}

#[test]
fn resolution_change_while_running() {
    let mut src = source(3);
    let mut enc = H264Encoder::new(H264Config::default()).unwrap();
    let mut dec = H264Decoder::new().unwrap();
    for i in 0..40u64 {
        if i == 20 {
            enc.set_resolution(640, 360).unwrap();
        }
        let frame = src.next_frame(i * FRAME_US);
        let au = enc.encode(&frame).unwrap().unwrap();
        assert_eq!(au.keyframe, i == 0 || i == 20, "frame {i}");
        let out = dec.decode(&au.data, au.capture_us).unwrap().unwrap();
        let want = if i < 20 { (1280, 720) } else { (640, 360) };
        assert_eq!((out.width(), out.height()), want);
        // The marker layout scales with the picture.
        assert_eq!(
            read_marker(&out).map(|m| m.counter),
            Some(i as u32),
            "frame {i}"
        );
    }
    assert!(enc.set_resolution(641, 360).is_err());
}

#[test]
fn corrupt_input_is_an_error_not_a_panic() {
    let mut dec = H264Decoder::new().unwrap();
    // Deterministic garbage, with and without start codes.
    let mut x: u32 = 12345;
    for round in 0..200 {
        let len = 1 + (round * 37) % 3000;
        let mut data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        if round % 2 == 0 && data.len() > 5 {
            data[..4].copy_from_slice(&[0, 0, 0, 1]);
        }
        match dec.decode(&data, 0) {
            Ok(_) | Err(MediaError::H264Decode(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // A truncated real IDR: error or no picture, and the decoder still works afterwards.
    let mut enc = H264Encoder::new(H264Config {
        width: 320,
        height: 180,
        bitrate_bps: 300_000,
        ..Default::default()
    })
    .unwrap();
    let frame = VideoFrame::filled(320, 180, 100, 0).unwrap();
    let au = enc.encode(&frame).unwrap().unwrap();
    let _ = dec.decode(&au.data[..au.data.len() / 2], 0);
    let mut dec = H264Decoder::new().unwrap();
    assert!(dec.decode(&au.data, 0).unwrap().is_some());
}
