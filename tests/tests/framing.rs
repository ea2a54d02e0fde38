//! Frames over a real OS byte stream (TCP on loopback, port chosen by the OS), written in odd
//! pieces, read with `FrameBuffer` exactly as a QUIC stream reader will.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use synesis_proto::message::{Cost, EscalationChunk, EscalationDone, FinishReason, Usage};
use synesis_proto::*;

fn chunks(id: RequestId, n: u32) -> Vec<Message> {
    let mut out: Vec<Message> = (0..n)
        .map(|seq| {
            EscalationChunk {
                request_id: id,
                seq,
                text: format!("piece {seq} ✓ "),
            }
            .into()
        })
        .collect();
    out.push(
        EscalationDone {
            request_id: id,
            chunks: n,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                input_tokens: 12,
                output_tokens: u64::from(n),
            },
            cost: Cost {
                base: MicroUsd(10),
                markup: MicroUsd(1),
                total: MicroUsd(11),
            },
            usage_counted: false,
            logprobs: Vec::new(),
        }
        .into(),
    );
    out
}

/// Reads frames until the peer closes; returns them and how the stream ended.
fn read_all(mut stream: TcpStream) -> (Vec<Message>, Result<(), FrameError>) {
    let mut buffer = FrameBuffer::new(FrameLimits::default());
    let mut messages = Vec::new();
    let mut scratch = [0u8; 7]; // small reads on purpose: frames arrive in many pieces
    loop {
        let n = stream.read(&mut scratch).expect("read");
        if n == 0 {
            return (messages, buffer.finish());
        }
        buffer.extend(&scratch[..n]);
        loop {
            match buffer.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(e) => return (messages, Err(e)),
            }
        }
    }
}

fn loopback() -> (TcpListener, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

#[test]
fn a_streamed_answer_crosses_a_real_socket_in_pieces() {
    let (listener, addr) = loopback();
    let sent = chunks(RequestId::from_parts(5, [5; 10]), 200);
    let to_send = sent.clone();
    let writer = thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let mut bytes = Vec::new();
        for m in &to_send {
            encode_frame(m, FrameLimits::default(), &mut bytes).expect("encode");
        }
        for piece in bytes.chunks(13) {
            stream.write_all(piece).expect("write");
        }
    });
    let (stream, _) = listener.accept().expect("accept");
    let (received, end) = read_all(stream);
    writer.join().expect("writer");
    end.expect("clean end of stream");
    assert_eq!(received, sent);
}

#[test]
fn an_oversize_header_stops_the_reader_and_a_cut_frame_is_truncated() {
    let (listener, addr) = loopback();
    let writer = thread::spawn(move || {
        // A valid frame, then a header announcing 4 GiB.
        let mut stream = TcpStream::connect(addr).expect("connect");
        let ok = chunks(RequestId::from_parts(6, [6; 10]), 1).remove(0);
        stream
            .write_all(&encode_frame_vec(&ok, FrameLimits::default()).unwrap())
            .unwrap();
        stream
            .write_all(&[MessageType::UploadChunk.as_u8(), 0xff, 0xff, 0xff, 0xff])
            .unwrap();
        // A second connection whose frame is cut short.
        let mut cut = TcpStream::connect(addr).expect("connect");
        let frame = encode_frame_vec(&ok, FrameLimits::default()).unwrap();
        cut.write_all(&frame[..frame.len() - 3]).unwrap();
    });
    let (first, _) = listener.accept().expect("accept");
    let (second, _) = listener.accept().expect("accept");
    writer.join().expect("writer");

    let (received, end) = read_all(first);
    assert_eq!(
        received.len(),
        1,
        "the valid frame before the bad header is delivered"
    );
    assert_eq!(end.unwrap_err().code(), ErrorCode::FRAME_OVERSIZE);

    let (received, end) = read_all(second);
    assert!(received.is_empty());
    assert_eq!(end.unwrap_err().code(), ErrorCode::FRAME_TRUNCATED);
}
