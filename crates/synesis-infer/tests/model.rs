//! llama.cpp on the tiny generated models: loading, determinism, LoRA hot-swap, cancellation,
//! limits, and bad files. Real model loads and real decoding, no doubles.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use synesis_infer::tiny::{TinySpec, write_lora, write_model};
use synesis_infer::{
    CancelToken, FinishReason, InferError, MetadataError, Model, Request, Settings,
};

/// One directory with the tiny model and adapter for the whole test binary.
fn fixtures() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static FIXTURES: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        let lora = dir.path().join("tiny-lora.gguf");
        write_model(&model, TinySpec::TINY).unwrap();
        write_lora(&lora, TinySpec::TINY, 7).unwrap();
        (dir, model, lora)
    })
}

fn settings() -> Settings {
    Settings {
        threads: 1,
        ..Settings::default()
    }
}

fn load() -> Model {
    Model::load(&fixtures().1, settings()).unwrap()
}

fn greedy(prompt: &str, max_tokens: u32) -> Request {
    Request {
        max_tokens,
        ..Request::new(prompt)
    }
}

fn run(model: &mut Model, request: &Request) -> (synesis_infer::Generation, Vec<String>) {
    let mut pieces = Vec::new();
    let g = model
        .generate(request, &CancelToken::default(), &mut |p| {
            pieces.push(p.to_owned())
        })
        .unwrap();
    (g, pieces)
}

#[test]
fn the_tiny_model_loads_and_greedy_generation_is_deterministic() {
    let mut model = load();
    let info = model.info().clone();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, TinySpec::TINY.n_ctx);
    assert!(info.has_chat_template);

    let request = greedy("hello world", 24);
    let (a, pieces) = run(&mut model, &request);
    let (b, _) = run(&mut model, &request);
    assert_eq!(a.text, b.text);
    assert_eq!(a.completion_tokens, b.completion_tokens);
    assert!(a.completion_tokens > 0 && a.prompt_tokens > 2);
    assert_eq!(pieces.concat(), a.text, "the stream adds up to the text");
    let lp = a.mean_logprob.unwrap();
    assert!(lp < 0.0 && lp.is_finite(), "{lp}");
    // A fresh model instance gives the same answer (nothing hidden carries over).
    let (c, _) = run(&mut load(), &request);
    assert_eq!(a.text, c.text);
}

#[test]
fn an_adapter_changes_the_output_and_detaching_restores_it_exactly() {
    let mut model = load();
    let base_request = greedy("the cloud and the device", 24);
    let (base, _) = run(&mut model, &base_request);

    let load_time = model.load_adapter("tiny", &fixtures().2).unwrap();
    eprintln!("measured: adapter load {load_time:?}");
    let with = Request {
        lora: Some(("tiny".into(), 1.0)),
        ..base_request.clone()
    };
    let (adapted, _) = run(&mut model, &with);
    assert_ne!(
        adapted.text, base.text,
        "the adapter must change greedy output"
    );
    eprintln!(
        "measured: adapter attach (swap) {:?}",
        adapted.lora_attach.unwrap()
    );

    let (again, _) = run(&mut model, &base_request);
    assert_eq!(
        again.text, base.text,
        "without the adapter the base output is back, byte for byte"
    );
    assert_eq!(again.lora_attach, None);

    let unknown = Request {
        lora: Some(("nope".into(), 1.0)),
        ..base_request
    };
    assert!(matches!(
        model.generate(&unknown, &CancelToken::default(), &mut |_| {}),
        Err(InferError::UnknownAdapter(_))
    ));
}

#[test]
fn cancellation_stops_within_one_token() {
    let mut model = load();
    let request = greedy("hello", 64);
    let (full, pieces) = run(&mut model, &request);
    assert!(
        pieces.len() > 4,
        "need a few pieces to cancel in the middle: {pieces:?}"
    );

    let cancel = CancelToken::default();
    let mut seen = Vec::new();
    let result = model
        .generate(&request, &cancel, &mut |p| {
            seen.push(p.to_owned());
            if seen.len() == 3 {
                cancel.cancel();
            }
        })
        .unwrap();
    assert_eq!(result.finish_reason, FinishReason::Cancelled);
    // Nothing was produced after the token during which the cancel came.
    assert_eq!(result.text, pieces[..3].concat());
    assert_eq!(result.text, seen.concat());
    assert!(result.completion_tokens < full.completion_tokens);

    // Cancelled before it starts: no token at all.
    let early = CancelToken::default();
    early.cancel();
    let none = model.generate(&request, &early, &mut |_| {}).unwrap();
    assert_eq!(
        (none.completion_tokens, none.finish_reason),
        (0, FinishReason::Cancelled)
    );
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let mut model = load();
    let (full, _) = run(&mut model, &greedy("hello world", 32));
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 8, "{:?}", full.text);
    let stop: String = chars[4..7].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let (stopped, pieces) = run(
        &mut model,
        &Request {
            stop: vec![stop.clone()],
            ..greedy("hello world", 32)
        },
    );
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(
        pieces.concat(),
        stopped.text,
        "the stop string never reached the stream"
    );

    let (short, _) = run(&mut model, &greedy("hello world", 3));
    assert_eq!(
        (short.completion_tokens, short.finish_reason),
        (3, FinishReason::Length)
    );
}

/// Sampling follows its settings: a seed reproduces its text (on a fresh instance too), other
/// seeds give other texts, a high temperature leaves the greedy text and one near zero keeps it.
#[test]
fn a_seed_reproduces_sampling_and_the_seed_and_temperature_change_it() {
    let mut model = load();
    let sampled = |seed: u32, temperature: f32| Request {
        temperature,
        top_p: Some(0.95),
        top_k: Some(40),
        seed,
        ..greedy("hello", 24)
    };
    let (a, _) = run(&mut model, &sampled(42, 0.8));
    let (b, _) = run(&mut model, &sampled(42, 0.8));
    assert_eq!(a.text, b.text);
    let (c, _) = run(&mut load(), &sampled(42, 0.8));
    assert_eq!(
        a.text, c.text,
        "a fresh instance, the same seed: the same text"
    );

    let greedy_text = run(&mut model, &greedy("hello", 24)).0.text;
    let hot: Vec<String> = (1..=8)
        .map(|seed| run(&mut model, &sampled(seed, 1.5)).0.text)
        .collect();
    let distinct: std::collections::BTreeSet<&String> = hot.iter().collect();
    assert!(distinct.len() >= 4, "the seed hardly matters: {hot:#?}");
    assert!(
        !hot.contains(&greedy_text),
        "a high temperature kept the greedy text {greedy_text:?}: {hot:#?}"
    );
    for seed in 1..=3 {
        let (cold, _) = run(&mut model, &sampled(seed, 0.001));
        assert_eq!(
            cold.text, greedy_text,
            "a temperature near zero, seed {seed}"
        );
    }
}

#[test]
fn the_chat_template_wraps_the_prompt_and_can_be_turned_off() {
    let mut model = load();
    let (chat, _) = run(&mut model, &greedy("hi", 1));
    let (plain, _) = run(
        &mut model,
        &Request {
            chat: false,
            ..greedy("hi", 1)
        },
    );
    assert!(
        chat.prompt_tokens > plain.prompt_tokens + 5,
        "{} vs {}",
        chat.prompt_tokens,
        plain.prompt_tokens
    );
}

#[test]
fn an_over_long_prompt_is_a_typed_error_before_decoding() {
    let model = Model::load(
        &fixtures().1,
        Settings {
            n_ctx: 32,
            ..settings()
        },
    )
    .unwrap();
    let err = model
        .generate(
            &Request {
                chat: false,
                ..greedy(&"x".repeat(200), 8)
            },
            &CancelToken::default(),
            &mut |_| {},
        )
        .unwrap_err();
    match err {
        InferError::PromptTooLong {
            prompt_tokens,
            context_tokens,
        } => {
            assert_eq!(context_tokens, 32);
            assert!(prompt_tokens >= 200, "{prompt_tokens}");
        }
        other => panic!("{other:?}"),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_files_get_clear_errors_and_no_crash() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = write(dir.path(), "notes.txt", b"hello, I am not a model");
    assert!(matches!(
        Model::load(&not_gguf, settings()),
        Err(InferError::Metadata(MetadataError::NotGguf(_)))
    ));

    let model_bytes = std::fs::read(&fixtures().1).unwrap();
    for keep in [10, 2_000, model_bytes.len() * 3 / 5] {
        let truncated = write(
            dir.path(),
            &format!("cut-{keep}.gguf"),
            &model_bytes[..keep],
        );
        let err = Model::load(&truncated, settings()).unwrap_err();
        assert!(
            matches!(
                err,
                InferError::Load { .. } | InferError::Metadata(MetadataError::Damaged(..))
            ),
            "{keep}: {err:?}"
        );
    }

    assert!(matches!(
        Model::load(Path::new("/nonexistent/model.gguf"), settings()),
        Err(InferError::NotFound(_))
    ));
    assert!(matches!(
        Model::load(&fixtures().2, settings()),
        Err(InferError::IsAdapter { .. })
    ));

    let mut model = load();
    assert!(matches!(
        model.load_adapter("m", &fixtures().1),
        Err(InferError::NotAdapter { .. })
    ));
    let mut other_arch = std::fs::read(&fixtures().2).unwrap();
    let at = other_arch.windows(5).position(|w| w == b"llama").unwrap();
    other_arch[at..at + 5].copy_from_slice(b"qwen2");
    let foreign = write(dir.path(), "qwen-lora.gguf", &other_arch);
    match model.load_adapter("q", &foreign) {
        Err(InferError::ArchitectureMismatch { adapter, model, .. }) => {
            assert_eq!((adapter.as_str(), model.as_str()), ("qwen2", "llama"))
        }
        other => panic!("{other:?}"),
    }
    // The model still works after all that.
    assert!(run(&mut model, &greedy("hello", 4)).0.completion_tokens > 0);
}

#[test]
fn one_load_serves_parallel_generations_each_as_if_alone() {
    let mut model = load();
    model.load_adapter("style", &fixtures().2).unwrap();
    let plain = greedy("parallel", 24);
    let styled = Request {
        lora: Some(("style".into(), 1.0)),
        ..greedy("parallel", 24)
    };
    let (alone_plain, _) = run(&mut model, &plain);
    let (alone_styled, _) = run(&mut model, &styled);
    assert_ne!(
        alone_plain.text, alone_styled.text,
        "the adapter changes the answer"
    );
    assert_eq!(
        model.prompt_tokens(&plain).unwrap(),
        alone_plain.prompt_tokens,
        "the count before running is the count it runs with"
    );
    let model = &model;
    let answers: Vec<(String, String)> = std::thread::scope(|s| {
        let running: Vec<_> = (0..4)
            .map(|i| {
                let request = if i % 2 == 0 { &plain } else { &styled };
                s.spawn(move || {
                    let g = model
                        .generate(request, &CancelToken::default(), &mut |_| {})
                        .unwrap();
                    (request.prompt.clone(), g.text)
                })
            })
            .collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (_, text)) in answers.iter().enumerate() {
        let alone = if i % 2 == 0 {
            &alone_plain
        } else {
            &alone_styled
        };
        assert_eq!(
            text, &alone.text,
            "generation {i} was disturbed by its neighbours"
        );
    }
}

#[test]
fn earlier_turns_come_before_the_prompt() {
    let model = load();
    let alone = greedy("question", 8);
    let with_system = Request {
        context: vec![synesis_infer::ChatMessage {
            role: "system".into(),
            content: "be brief".into(),
        }],
        ..greedy("question", 8)
    };
    assert!(model.prompt_tokens(&with_system).unwrap() > model.prompt_tokens(&alone).unwrap());
}

#[test]
fn adapters_load_on_demand_while_generations_run_and_the_least_recently_used_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("second-lora.gguf");
    write_lora(&second, TinySpec::TINY, 8).unwrap();
    let first = fixtures().2.clone();
    let model = Model::load(
        &fixtures().1,
        Settings {
            adapters_max: 1,
            ..settings()
        },
    )
    .unwrap();
    model.load_adapter("pinned", &first).unwrap();
    let ask = |name: &str, file: Option<&Path>, max_tokens| {
        let request = Request {
            lora: Some((name.into(), 1.0)),
            lora_file: file.map(Path::to_owned),
            ..greedy("on demand", max_tokens)
        };
        model
            .generate(&request, &CancelToken::default(), &mut |_| {})
            .unwrap()
    };
    let reference = ask("pinned", None, 24);

    let cold = ask("a", Some(&first), 24);
    assert_eq!(cold.text, reference.text, "the same file, the same answer");
    assert!(cold.lora_load.is_some(), "loaded by this generation");
    let warm = ask("a", Some(&first), 24);
    assert_eq!(
        (warm.text.as_str(), warm.lora_load),
        (reference.text.as_str(), None)
    );

    let other = ask("b", Some(&second), 24);
    assert_ne!(
        other.text, reference.text,
        "another adapter, another answer"
    );
    assert_eq!(model.cached_adapters(), ["b"], "a was evicted (bound 1)");
    assert_eq!(model.adapters(), ["pinned"], "pinned adapters stay");
    let again = ask("a", Some(&first), 24);
    assert!(again.lora_load.is_some(), "evicted, so loaded again");
    assert_eq!(again.text, reference.text, "and it answers as before");

    // A long generation on `a` while other threads load and evict adapters: it finishes on
    // the adapter it started with (held until it ends), and every answer is the one it gives
    // alone.
    let long_alone = ask("pinned", None, 200);
    let short_b = ask("b", Some(&second), 24).text;
    std::thread::scope(|s| {
        let long = s.spawn(|| ask("a", Some(&first), 200).text);
        let churn = s.spawn(|| {
            (0..6)
                .map(|i| {
                    if i % 2 == 0 {
                        ask("b", Some(&second), 24).text
                    } else {
                        ask("c", Some(&first), 24).text
                    }
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(long.join().unwrap(), long_alone.text);
        for (i, text) in churn.join().unwrap().into_iter().enumerate() {
            let want = if i % 2 == 0 {
                &short_b
            } else {
                &reference.text
            };
            assert_eq!(&text, want, "churn {i}");
        }
    });

    assert!(model.forget_adapter("c") || model.forget_adapter("b"));
    assert!(matches!(
        model.generate(
            &Request {
                lora: Some(("never-loaded".into(), 1.0)),
                ..greedy("x", 4)
            },
            &CancelToken::default(),
            &mut |_| {}
        ),
        Err(InferError::UnknownAdapter(_))
    ));
}

/// The tiny model with room for a tool's instructions (its byte-level vocabulary makes every
/// character a token or so).
fn roomy() -> Model {
    static ROOMY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = ROOMY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roomy.gguf");
        let spec = TinySpec {
            n_ctx: 4096,
            ..TinySpec::TINY
        };
        write_model(&path, spec).unwrap();
        (dir, path)
    });
    Model::load(path, settings()).unwrap()
}

#[test]
fn a_required_tool_call_is_valid_even_on_random_weights_and_parses_back() {
    use synesis_infer::tools::{Tool, ToolChoice, ToolEvent, ToolParser};
    let mut model = roomy();
    let tools = vec![Tool {
        name: "weather".into(),
        description: "The weather in a city.".into(),
        parameters: Some(serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        })),
    }];
    for seed in [1, 2, 3] {
        let request = Request {
            max_tokens: 200,
            temperature: 1.0,
            seed,
            grammar: Some(synesis_infer::tools::grammar(&tools, &ToolChoice::Required).unwrap()),
            ..Request::new("What is the weather in Paris?")
        };
        let (g, _) = run(&mut model, &request);
        let mut parser = ToolParser::new();
        let mut events = parser.push(&g.text);
        events.extend(parser.finish());
        let [ToolEvent::Call { name, arguments }] = events.as_slice() else {
            panic!("seed {seed}: not one call: {:?} from {:?}", events, g.text);
        };
        assert_eq!(name, "weather");
        let arguments: serde_json::Value = serde_json::from_str(arguments).unwrap();
        assert!(["Paris", "Oslo"].contains(&arguments["city"].as_str().unwrap()));
        assert!(arguments["days"].is_i64(), "{arguments}");
        assert_eq!(g.finish_reason, FinishReason::Stop, "{:?}", g.text);
    }
}

#[test]
fn a_json_schema_holds_the_answer_and_logprobs_spell_the_text() {
    let mut model = roomy();
    let schema = r#"{"type":"object","properties":{"ok":{"type":"boolean"},"n":{"type":"integer"}},"required":["ok","n"],"additionalProperties":false}"#;
    let request = Request {
        max_tokens: 100,
        temperature: 0.9,
        seed: 5,
        grammar: Some(synesis_infer::Grammar::json_schema(schema).unwrap()),
        logprobs: Some(3),
        ..Request::new("hello")
    };
    let (g, _) = run(&mut model, &request);
    let v: serde_json::Value =
        serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {:?}", g.text));
    assert!(v["ok"].is_boolean() && v["n"].is_i64(), "{v}");
    let spelled: Vec<u8> = g.tokens.iter().flat_map(|t| t.bytes.clone()).collect();
    assert_eq!(String::from_utf8(spelled).unwrap(), g.text);
    // Every token but the end of generation.
    assert!(g.tokens.len() + 1 >= g.completion_tokens && g.tokens.len() <= g.completion_tokens);
    for t in &g.tokens {
        assert!(t.logprob <= 0.0 && t.top.len() == 3);
        assert!(
            t.top.windows(2).all(|w| w[0].1 >= w[1].1),
            "most likely first"
        );
    }
    let bad = Request {
        grammar: Some(synesis_infer::Grammar {
            gbnf: "root ::= nothing".into(),
            root: "root".into(),
            triggers: Vec::new(),
        }),
        ..Request::new("x")
    };
    let err = model
        .generate(&bad, &CancelToken::default(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, InferError::Grammar(_)), "{err}");
}

#[test]
fn penalties_change_a_greedy_answer() {
    let mut model = load();
    let plain = run(&mut model, &greedy("hello", 24)).0.text;
    let penalised = Request {
        presence_penalty: 2.0,
        frequency_penalty: 2.0,
        ..greedy("hello", 24)
    };
    assert_ne!(run(&mut model, &penalised).0.text, plain);
}

#[test]
fn an_embedding_model_gives_unit_vectors_of_its_width() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embed.gguf");
    synesis_infer::tiny::write_embedding_model(&path, TinySpec::TINY).unwrap();
    let model = Model::load(&path, settings()).unwrap();
    let texts = vec![
        "hello world".to_owned(),
        "the cloud".to_owned(),
        "hello world".to_owned(),
    ];
    let e = model.embed(&texts, &CancelToken::default()).unwrap();
    let cancelled = CancelToken::default();
    cancelled.cancel();
    assert!(matches!(
        model.embed(&texts, &cancelled),
        Err(InferError::Cancelled)
    ));
    assert_eq!(e.vectors.len(), 3);
    for v in &e.vectors {
        assert_eq!(v.len(), TinySpec::TINY.n_embd as usize);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    assert_eq!(e.vectors[0], e.vectors[2], "the same text, the same vector");
    assert_ne!(e.vectors[0], e.vectors[1]);
    assert!(e.prompt_tokens > 0);
}

/// What a request's grammar can ask of llama.cpp never aborts the process: a schema no text
/// satisfies ends the answer, one that would expand without end (or past the bound) is refused
/// before llama.cpp parses it, and so is an empty prompt.
#[test]
fn impossible_schemas_and_empty_prompts_are_answered_or_refused_never_a_crash() {
    let mut model = roomy();
    for schema in [
        r#"{"type":"integer","minimum":5,"maximum":3}"#,
        r#"{"type":"integer","exclusiveMinimum":3,"exclusiveMaximum":4}"#,
    ] {
        let request = Request {
            max_tokens: 20,
            grammar: Some(synesis_infer::Grammar::json_schema(schema).unwrap()),
            ..Request::new("hello")
        };
        let (g, _) = run(&mut model, &request);
        assert_eq!(
            g.finish_reason,
            FinishReason::Stop,
            "{schema}: {:?}",
            g.text
        );
    }
    for schema in [
        r#"{"type":"string","minLength":5,"maxLength":2}"#,
        r#"{"type":"array","items":{"type":"integer"},"maxItems":100000}"#,
    ] {
        let err = synesis_infer::Grammar::json_schema(schema).unwrap_err();
        assert!(matches!(err, InferError::Grammar(_)), "{schema}: {err}");
    }
    let huge = format!(
        r#"{{"type":"object","properties":{{{}}}}}"#,
        (0..3000)
            .map(|i| format!(r#""p{i}":{{"type":"string"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(synesis_infer::Grammar::json_schema(&huge).is_err());
    let empty = Request {
        chat: false,
        ..Request::new("")
    };
    let unbos = model.generate(&empty, &CancelToken::default(), &mut |_| {});
    // This model adds a start token, so an empty raw prompt is one token; the check is for
    // models that add none.
    assert!(unbos.is_ok() || matches!(unbos, Err(InferError::EmptyPrompt)));
}
