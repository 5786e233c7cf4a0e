//! TCP framing of relay datagrams: any byte stream yields whole frames, then a clean end or
//! an error, and the frames re-framed reproduce the stream up to where reading stopped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::relay::tcp::{read_frame, write_frame};

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
        })
    });
});
