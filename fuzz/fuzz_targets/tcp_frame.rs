//! TCP framing of relay datagrams: any byte stream yields whole frames, then a clean end or
//! an error, and the frames re-framed reproduce the stream up to where reading stopped; the
//! relay's sans-IO decoder, fed the same stream in chunks, agrees and keeps to its cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::relay::tcp::{read_frame, write_frame, FrameDecoder, FrameTooLong};

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without drivers always builds");
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let mut stream = data;
            let mut frames = Vec::new();
            while let Ok(Some(frame)) = read_frame(&mut stream).await {
                frames.push(frame);
            }
            let mut written = Vec::new();
            for f in &frames {
                write_frame(&mut written, f)
                    .await
                    .expect("frames read from a stream fit in a frame");
            }
            assert_eq!(&data[..written.len()], &written[..]);
            decoder_agrees(data, &frames);
        })
    });
});

/// The relay's sans-IO decoder, fed `data` in chunks whose sizes come from the first byte and
/// with a cap from the second, yields the frames `read_frame` read up to the first one over the
/// cap, refuses that one, and between frames never holds more than a prefix and the cap.
fn decoder_agrees(data: &[u8], frames: &[Vec<u8>]) {
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let cap = usize::from(data.get(1).copied().unwrap_or(0)) * 64;
    let mut decoder = FrameDecoder::new(cap);
    let mut decoded = Vec::new();
    let mut refused = None;
    'feed: for piece in data.chunks(chunk) {
        decoder.handle_bytes(piece);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => decoded.push(frame),
                Ok(None) => break,
                Err(e) => {
                    refused = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(
            decoder.buffered() < 2 + cap,
            "decoder buffered past its cap"
        );
    }
    let within: Vec<&Vec<u8>> = frames.iter().take_while(|f| f.len() <= cap).collect();
    assert_eq!(decoded.iter().collect::<Vec<_>>(), within);
    if let Some(FrameTooLong { announced, cap: c }) = refused {
        assert!(announced > c);
    }
}
