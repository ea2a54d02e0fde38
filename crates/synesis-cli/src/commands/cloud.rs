//! `synesis cloud …`: enrollment, and questions to the running tunnel service.

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_proto::message::{DeviceLeave, ErrorMsg};
use synesis_proto::{ErrorCode, Message, SetupToken};
use synesis_tunnel::enroll::{enroll, new_request_id};
use synesis_tunnel::{Identity, request::request};

use super::Output;
use crate::cli::{LoginArgs, LogoutArgs, PingArgs};
use crate::exit::UserError;
use crate::paths::Paths;
use crate::service::{Request, ask};

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".to_owned())
}

pub(crate) async fn login(out: &Output, paths: &Paths, args: &LoginArgs) -> anyhow::Result<()> {
    let token: SetupToken = args
        .token
        .parse()
        .map_err(|e| UserError::Usage(format!("{e}")))?;
    let data = &paths.data.path;
    if let Some(existing) = Identity::load(data)? {
        bail!(
            "this device is already enrolled as {} in account {}; run `synesis cloud logout` first",
            existing.info.device_id,
            existing.info.account
        );
    }
    let name = args.name.clone().unwrap_or_else(host_name);
    let identity = enroll(&token, &name).await.context("enrollment failed")?;
    identity.save(data)?;
    #[derive(Serialize)]
    struct View<'a> {
        device_id: synesis_proto::DeviceId,
        account: &'a str,
        server: &'a str,
    }
    let view = View {
        device_id: identity.info.device_id,
        account: &identity.info.account,
        server: &identity.info.server,
    };
    out.report(&view, || {
        format!(
            "enrolled: device {} in account {} at {}\nnext: `synesis tunnel run` keeps this device connected\n",
            view.device_id, view.account, view.server
        )
    })?;
    Ok(())
}

pub(crate) async fn logout(out: &Output, paths: &Paths, args: &LogoutArgs) -> anyhow::Result<()> {
    let data = &paths.data.path;
    let Some(identity) = Identity::load(data)? else {
        bail!("this device is not enrolled; nothing to log out of");
    };
    let leave: Message = DeviceLeave {
        request_id: new_request_id(),
    }
    .into();
    let revoked = match request(&identity, leave).await {
        Ok(Message::DeviceLeft(_)) => Ok(()),
        Ok(Message::ErrorMsg(ErrorMsg {
            code: ErrorCode::DEVICE_REVOKED,
            ..
        })) => Ok(()),
        Ok(Message::ErrorMsg(e)) => Err(format!("{}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {:?}", other.message_type())),
        // A revoked device is refused at the handshake: it is revoked already.
        Err(e) if e.to_string().contains("revoked") => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = &revoked {
        if !args.force {
            bail!(
                "could not revoke this device on the cloud ({why}); the identity is kept. Use --force to delete it anyway"
            );
        }
        eprintln!(
            "synesis: warning: could not revoke device {} on the cloud ({why}); ask the account owner to revoke it",
            identity.info.device_id
        );
    }
    Identity::remove(data)?;
    let view =
        serde_json::json!({"device_id": identity.info.device_id, "revoked": revoked.is_ok()});
    out.report(&view, || {
        format!(
            "logged out: device {} removed from this machine\n",
            identity.info.device_id
        )
    })?;
    Ok(())
}

pub(crate) async fn status(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let reply = ask(&paths.runtime.path, &Request::Status).await?;
    let status = match (reply.ok, reply.status) {
        (true, Some(s)) => s,
        _ => bail!(
            "the tunnel service answered: {}",
            reply.error.unwrap_or_default()
        ),
    };
    out.report(&status, || {
        let field = |k: &str| match &status[k] {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let rtt = status["rtt_ms"].as_f64().map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2} ms"));
        let mut text = format!(
            "state            {}\ndevice           {}\naccount          {}\nserver           {}\nrtt              {rtt}\nlast ack         {}\nconnected since  {}\nreconnects       {}\n",
            field("state"),
            field("device_id"),
            field("account"),
            field("server"),
            field("last_heartbeat_ack_at"),
            field("connected_since"),
            field("reconnects"),
        );
        if !status["failure"].is_null() {
            text.push_str(&format!("failure          {}\n", field("failure")));
        }
        text
    })?;
    Ok(())
}

pub(crate) async fn ping(out: &Output, paths: &Paths, args: &PingArgs) -> anyhow::Result<()> {
    let mut rtts = Vec::with_capacity(args.count as usize);
    for i in 0..args.count {
        if i > 0 {
            tokio::time::sleep(args.interval).await;
        }
        let reply = ask(&paths.runtime.path, &Request::Ping).await?;
        match (reply.ok, reply.rtt_ms) {
            (true, Some(ms)) => {
                if !out.json() {
                    println!("heartbeat ack from the cloud: rtt {ms:.3} ms");
                }
                rtts.push(ms);
            }
            _ => bail!("ping failed: {}", reply.error.unwrap_or_default()),
        }
    }
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().copied().fold(0.0, f64::max);
    #[allow(clippy::cast_precision_loss)] // a count of pings
    let avg = rtts.iter().sum::<f64>() / rtts.len().max(1) as f64;
    let view = serde_json::json!({"count": rtts.len(), "rtts_ms": rtts, "min_ms": min, "avg_ms": avg, "max_ms": max});
    out.report(&view, || {
        format!(
            "{} pings: min {min:.3} ms, avg {avg:.3} ms, max {max:.3} ms\n",
            rtts.len()
        )
    })?;
    Ok(())
}
