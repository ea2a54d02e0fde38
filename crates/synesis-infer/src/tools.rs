//! Tool calls, in one plain format every model can be taught and held to.
//!
//! The model is told its tools in a system turn ([`system_text`]) and calls one by writing
//!
//! ```text
//! <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
//! ```
//!
//! A grammar built from the tools' JSON schemas ([`grammar`], through llama.cpp's converter)
//! makes that text valid whatever the weights: from the first token when a call is required,
//! or from the moment the model writes `<tool_call>` when it may choose. [`ToolParser`] takes the
//! calls back out of the streamed text. Earlier calls and their results go back into the
//! conversation in the same format ([`render_call`], [`render_result`]).
//!
//! (llama.cpp's server applies each model's own Jinja template with tools; `llama-cpp-2`
//! 0.1.160 no longer exposes that layer, only its grammar parts, which this uses.)

use crate::engine::{ChatMessage, Grammar, InferError, Request};

/// Where a call starts and ends in the text.
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// A JSON schema of its arguments (an object); `None` takes any object.
    pub parameters: Option<serde_json::Value>,
}

/// Whether the model must call a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// It may answer in text or call one.
    Auto,
    /// It must call one of them.
    Required,
    /// It must call this one.
    Named(String),
}

/// The system turn that teaches the model its tools and the format of a call.
pub fn system_text(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut text = String::from(
        "You can call these tools. To call one, answer with exactly\n\
         <tool_call>{\"name\": TOOL_NAME, \"arguments\": ARGUMENTS_AS_JSON}</tool_call>\n\
         and nothing else; its result comes back as <tool_response>…</tool_response>.\n\nTools:\n",
    );
    for tool in tools {
        let parameters = tool
            .parameters
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        text.push_str(&format!(
            "- {}: {} Arguments (JSON schema): {parameters}\n",
            tool.name, tool.description
        ));
    }
    match choice {
        ToolChoice::Auto => {
            text.push_str("\nCall a tool only when it helps; otherwise answer in text.")
        }
        ToolChoice::Required => text.push_str("\nAnswer with a tool call."),
        ToolChoice::Named(name) => text.push_str(&format!("\nAnswer with a call of {name}.")),
    }
    text
}

/// The grammar of one call of one of `tools` (of the named one, for [`ToolChoice::Named`]),
/// holding from the first token unless the model may choose ([`ToolChoice::Auto`]: then from
/// [`CALL_OPEN`] on).
pub fn grammar(tools: &[Tool], choice: &ToolChoice) -> Result<Grammar, InferError> {
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    if allowed.is_empty() {
        return Err(InferError::Grammar(match choice {
            ToolChoice::Named(name) => format!("no tool is named {name:?}"),
            _ => "no tools were given".into(),
        }));
    }
    let calls: Vec<serde_json::Value> = allowed
        .iter()
        .map(|tool| {
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    "arguments": tool.parameters.clone().unwrap_or_else(|| serde_json::json!({"type": "object"})),
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if calls.len() == 1 {
        calls.into_iter().next().unwrap_or_default()
    } else {
        serde_json::json!({"oneOf": calls})
    };
    let mut grammar = Grammar::json_schema(&schema.to_string())?;
    grammar.gbnf.push_str(&format!(
        "\nsynesis-tool-call ::= {} {} {}\n",
        gbnf_literal(CALL_OPEN),
        grammar.root,
        gbnf_literal(CALL_CLOSE)
    ));
    grammar.root = "synesis-tool-call".into();
    if *choice == ToolChoice::Auto {
        grammar.triggers = vec![CALL_OPEN.to_owned()];
    }
    Ok(grammar)
}

/// Shapes `request` for tools or a response format: tools that may be called are taught in a
/// system turn (the first of `request.context`) and held by [`grammar`]; otherwise a format's
/// JSON schema (`{"type": "object"}` for any object) holds the answer. Tools that may not be
/// called (`choice` `None`) are not taught. The device's API and the cloud's model both shape
/// their requests here.
pub fn shape(
    request: &mut Request,
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    schema: Option<&str>,
) -> Result<(), InferError> {
    request.grammar = match (choice, schema) {
        (Some(choice), _) => Some(grammar(tools, choice)?),
        (None, Some(schema)) => Some(Grammar::json_schema(schema)?),
        (None, None) => None,
    };
    if let Some(choice) = choice {
        let taught = system_text(tools, choice);
        match request.context.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{taught}", first.content);
            }
            _ => request.context.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: taught,
                },
            ),
        }
    }
    Ok(())
}

fn gbnf_literal(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An earlier call, as the model wrote it.
pub fn render_call(name: &str, arguments: &str) -> String {
    let arguments: serde_json::Value =
        serde_json::from_str(arguments).unwrap_or(serde_json::Value::String(arguments.to_owned()));
    format!(
        "{CALL_OPEN}{}{CALL_CLOSE}",
        serde_json::json!({"name": name, "arguments": arguments})
    )
}

/// A tool's result, as the model is told it.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>{content}</tool_response>")
}

/// What the text of an answer holds: text for the reader, or a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Text(String),
    /// `arguments` is a JSON object, as text.
    Call {
        name: String,
        arguments: String,
    },
}

/// Takes calls out of an answer's text as it streams: text that may be the start of a call is
/// held back until it is known not to be.
#[derive(Debug, Default)]
pub struct ToolParser {
    held: String,
    in_call: bool,
    calls: usize,
}

impl ToolParser {
    pub fn new() -> ToolParser {
        ToolParser::default()
    }

    /// How many calls it has taken out.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.held.push_str(text);
        let mut events = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CALL_CLOSE) else {
                    break;
                };
                let body: String = self.held.drain(..end + CALL_CLOSE.len()).collect();
                events.push(self.call(&body[..end], CALL_CLOSE));
                self.in_call = false;
            } else if let Some(at) = self.held.find(CALL_OPEN) {
                if at > 0 {
                    events.push(ToolEvent::Text(self.held[..at].to_owned()));
                }
                self.held.drain(..at + CALL_OPEN.len());
                self.in_call = true;
            } else {
                // All but a tail that could begin `<tool_call>`.
                let keep = (1..CALL_OPEN.len())
                    .rev()
                    .find(|&n| self.held.ends_with(&CALL_OPEN[..n]))
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                if cut > 0 {
                    events.push(ToolEvent::Text(self.held.drain(..cut).collect()));
                }
                break;
            }
        }
        events
    }

    /// The end of the text: a call cut short (the answer's length ran out) is a call if what
    /// was written of it parses, and text otherwise.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let held = std::mem::take(&mut self.held);
        if self.in_call {
            self.in_call = false;
            return vec![self.call(&held, "")];
        }
        if held.is_empty() {
            Vec::new()
        } else {
            vec![ToolEvent::Text(held)]
        }
    }

    /// The call `body` makes, or the text it was (`close`: the closing tag it had).
    fn call(&mut self, body: &str, close: &str) -> ToolEvent {
        let parsed: Option<(String, String)> = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?.to_owned();
                let arguments = v.get("arguments").cloned().unwrap_or(serde_json::json!({}));
                Some((name, arguments.to_string()))
            });
        match parsed {
            Some((name, arguments)) => {
                self.calls += 1;
                ToolEvent::Call { name, arguments }
            }
            None => ToolEvent::Text(format!("{CALL_OPEN}{body}{close}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(pieces: &[&str]) -> Vec<ToolEvent> {
        let mut p = ToolParser::new();
        let mut events: Vec<ToolEvent> = pieces.iter().flat_map(|t| p.push(t)).collect();
        events.extend(p.finish());
        // Adjacent texts as one, whatever the pieces.
        let mut merged: Vec<ToolEvent> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(ToolEvent::Text(a)), ToolEvent::Text(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    #[test]
    fn a_call_split_anywhere_is_taken_out_of_the_text() {
        let text = r#"Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>"#;
        for split in 0..text.len() {
            if !text.is_char_boundary(split) {
                continue;
            }
            let events = all(&[&text[..split], &text[split..]]);
            assert_eq!(
                events,
                vec![
                    ToolEvent::Text("Let me look.".into()),
                    ToolEvent::Call {
                        name: "weather".into(),
                        arguments: r#"{"city":"Paris"}"#.into()
                    }
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_text() {
        assert_eq!(
            all(&["a <tool", " b"]),
            vec![ToolEvent::Text("a <tool b".into())]
        );
        assert_eq!(
            all(&["<tool_call>not json</tool_call> after"]),
            vec![ToolEvent::Text(
                "<tool_call>not json</tool_call> after".into()
            )]
        );
        assert_eq!(
            all(&["ends <tool_c"]),
            vec![ToolEvent::Text("ends <tool_c".into())]
        );
    }

    #[test]
    fn a_call_cut_short_is_a_call_when_what_was_written_parses() {
        let events = all(&[r#"<tool_call>{"name":"f","arguments":{}}"#]);
        assert_eq!(
            events,
            vec![ToolEvent::Call {
                name: "f".into(),
                arguments: "{}".into()
            }]
        );
    }

    #[test]
    fn an_earlier_call_renders_as_the_model_writes_one() {
        let rendered = render_call("f", r#"{"x": 1}"#);
        assert_eq!(
            rendered,
            r#"<tool_call>{"arguments":{"x":1},"name":"f"}</tool_call>"#
        );
        assert_eq!(
            all(&[&rendered]),
            vec![ToolEvent::Call {
                name: "f".into(),
                arguments: r#"{"x":1}"#.into()
            }]
        );
    }
}
