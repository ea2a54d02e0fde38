//! `synesis cloud …`: enrollment, and questions to the running tunnel service.

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_ledger_local::{CloudCharge, LocalLedger, machine_charges};
use synesis_proto::message::DeviceLeave;
use synesis_proto::{Message, SetupToken};
use synesis_tunnel::clock::{new_request_id, unix_now};
use synesis_tunnel::enroll::{PendingEnrollment, enroll};
use synesis_tunnel::local::{ClientError, LocalClient};
use synesis_tunnel::request::{RequestError, answer, request};
use synesis_tunnel::{Identity, IdentityError};

use super::{Output, ledger_error};
use crate::cli::{CloudUsageArgs, InviteArgs, LoginArgs, LogoutArgs, PingArgs};
use crate::exit::UserError;
use crate::paths::Paths;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".to_owned())
}

pub(crate) async fn login(out: &Output, paths: &Paths, args: &LoginArgs) -> anyhow::Result<()> {
    let data = &paths.data.path;
    if let Some(existing) = Identity::load(data)? {
        bail!(
            "this device is already enrolled as {} in account {}; run `synesis cloud logout` first",
            existing.info.device_id,
            existing.info.account
        );
    }
    let identity = enroll_from(data, args).await?;
    identity.save(data)?;
    PendingEnrollment::remove(data)?;
    report_enrolled(out, &identity, false)
}

/// `synesis cloud accept CODE`: on a device not enrolled yet, the same as `login` (the device
/// becomes the invitee's in the inviting account). On an enrolled one, the device joins the
/// inviting account as well, with an identity of its own there (`Identity::joined_home`); the
/// account it acted in before stays the one it acts in until `synesis cloud use`.
pub(crate) async fn accept(out: &Output, paths: &Paths, args: &LoginArgs) -> anyhow::Result<()> {
    let data = &paths.data.path;
    let before = Identity::all(data)?;
    if before.is_empty() {
        return login(out, paths, args).await;
    }
    let joining = Identity::joining_home(data);
    let identity = enroll_from(&joining, args).await?;
    let home = Identity::joined_home(data, identity.info.account_id);
    if let Some((_, held)) = before
        .iter()
        .find(|(_, i)| i.info.account_id == identity.info.account_id)
    {
        // Two devices of one machine in one account would only confuse: the new one leaves.
        let leave: Message = DeviceLeave {
            request_id: new_request_id(),
        }
        .into();
        let left = request(&identity, leave).await.and_then(answer);
        PendingEnrollment::remove(&joining)?;
        let _ = std::fs::remove_dir(Identity::dir(&joining));
        if let Err(e) = left {
            tracing::warn!("the second device in the account could not leave: {e}");
        }
        bail!(
            "this device is in account {} already (as device {}); the invitation was used, and the extra device it made was revoked",
            held.info.account,
            held.info.device_id
        );
    }
    identity.save(&home)?;
    PendingEnrollment::remove(&joining)?;
    let _ = std::fs::remove_dir(Identity::dir(&joining));
    // The directories made on the way to the identity (`accounts/<id>/`), as private as it.
    if let Some(accounts) = home.parent() {
        crate::secure_fs::tighten(&[accounts]);
    }
    report_enrolled(out, &identity, true)
}

/// Enrolls with the setup token (or invitation code) in `args`, resuming an enrollment left
/// unfinished in `home`; the caller saves the identity and then removes the pending one.
async fn enroll_from(home: &std::path::Path, args: &LoginArgs) -> anyhow::Result<Identity> {
    let token: SetupToken = crate::secret_arg::secret_arg(&args.token, "setup token")?
        .parse()
        .map_err(|e| UserError::Usage(format!("{e}")))?;
    let pending = match PendingEnrollment::load(home) {
        Ok(pending) => pending,
        Err(IdentityError::Damaged(path)) => {
            eprintln!(
                "synesis: warning: {} is damaged; starting a new enrollment",
                path.display()
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let pending = match pending {
        Some(pending) if pending.is_for(&token) => {
            eprintln!(
                "synesis: resuming the enrollment of {:?} begun at {}",
                pending.device_name,
                pending
                    .begun_at
                    .to_rfc3339()
                    .unwrap_or_else(|| pending.begun_at.0.to_string())
            );
            pending
        }
        other => {
            if other.is_some() {
                eprintln!(
                    "synesis: warning: an enrollment begun with another setup token was never finished; starting over with this one"
                );
            }
            let name = args.name.clone().unwrap_or_else(host_name);
            let pending = PendingEnrollment::begin(&token, &name)?;
            // On disk before the cloud can commit: a crash from here on is resumed, not burned.
            pending.save(home)?;
            pending
        }
    };
    match enroll(&token, &pending).await {
        Ok(identity) => Ok(identity),
        Err(e) => {
            // Kept unless the cloud said it can never succeed: it may have committed already.
            if !e.resumable() {
                PendingEnrollment::remove(home)?;
            }
            Err(anyhow::Error::new(e).context("enrollment failed"))
        }
    }
}

fn report_enrolled(out: &Output, identity: &Identity, joined: bool) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct View<'a> {
        device_id: synesis_proto::DeviceId,
        account: &'a str,
        account_id: synesis_proto::AccountId,
        server: &'a str,
        /// In an account besides the one the device acted in before.
        joined: bool,
    }
    let info = &identity.info;
    let view = View {
        device_id: info.device_id,
        account: &info.account,
        account_id: info.account_id,
        server: &info.server,
        joined,
    };
    out.report(&view, || {
        if joined {
            format!(
                "joined: device {} in account {} at {}
act in it with `synesis --account {} cloud …`, or make it the default with `synesis cloud use {}`
",
                info.device_id, info.account, info.server, info.account, info.account
            )
        } else {
            format!(
                "enrolled: device {} in account {} at {}
next: `synesis tunnel run` keeps this device connected
",
                info.device_id, info.account, info.server
            )
        }
    })?;
    Ok(())
}

/// `synesis cloud accounts`: the accounts this device is in, and which one commands act in.
pub(crate) fn accounts(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let data = &paths.data.path;
    let active = paths.identity_home()?;
    let rows: Vec<serde_json::Value> = Identity::all(data)?
        .into_iter()
        .map(|(home, i)| {
            serde_json::json!({
                "account": i.info.account,
                "account_id": i.info.account_id,
                "device_id": i.info.device_id,
                "server": i.info.server,
                "enrolled_at": i.info.enrolled_at,
                "active": home == active,
            })
        })
        .collect();
    let view = serde_json::json!({ "accounts": rows });
    out.report(&view, || {
        if rows.is_empty() {
            return "this device is in no account; `synesis cloud login TOKEN` enrolls it\n".into();
        }
        let mut text = format!("{:<2}{:<24} {:<38} {}\n", "", "ACCOUNT", "DEVICE", "SERVER");
        for r in &rows {
            let mark = if r["active"] == true { "*" } else { "" };
            text.push_str(&format!(
                "{mark:<2}{:<24} {:<38} {}\n",
                r["account"].as_str().unwrap_or_default(),
                r["device_id"].as_str().unwrap_or_default(),
                r["server"].as_str().unwrap_or_default()
            ));
        }
        text
    })?;
    Ok(())
}

/// `synesis cloud use ACCOUNT`: the account later commands act in.
pub(crate) fn use_account(out: &Output, paths: &Paths, account: &str) -> anyhow::Result<()> {
    let data = &paths.data.path;
    let home =
        Identity::select(data, Some(account)).map_err(|e| UserError::Usage(e.to_string()))?;
    let Some(identity) = Identity::load(&home)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let first = home == *data;
    Identity::set_active(data, (!first).then_some(identity.info.account_id))?;
    let view = serde_json::json!({
        "account": identity.info.account,
        "account_id": identity.info.account_id,
        "device_id": identity.info.device_id,
    });
    out.report(&view, || {
        format!(
            "acting in account {} (device {})\n",
            identity.info.account, identity.info.device_id
        )
    })?;
    Ok(())
}

pub(crate) async fn logout(out: &Output, paths: &Paths, args: &LogoutArgs) -> anyhow::Result<()> {
    let data = &paths.identity_home()?;
    let Some(identity) = Identity::load(data)? else {
        bail!("this device is not enrolled; nothing to log out of");
    };
    let leave: Message = DeviceLeave {
        request_id: new_request_id(),
    }
    .into();
    let revoked = match request(&identity, leave).await.and_then(answer) {
        // Refused at the handshake or in the reply: it is revoked already.
        Ok(Message::DeviceLeft(_)) | Err(RequestError::Revoked) => Ok(()),
        Ok(other) => Err(format!("unexpected answer {:?}", other.message_type())),
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
    if Identity::active(&paths.data.path)? == Some(identity.info.account_id.to_string()) {
        // It was the account chosen with `use`: the device acts in its first one again.
        Identity::set_active(&paths.data.path, None)?;
    }
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

/// The running tunnel service's local API; `UserError::NotRunning` (exit 3) when nothing answers.
fn service(paths: &Paths) -> LocalClient {
    LocalClient::new(&paths.runtime.path)
}

fn not_running(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::NotRunning => UserError::NotRunning.into(),
        other => other.into(),
    }
}

pub(crate) async fn status(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let status = service(paths).status().await.map_err(not_running)?;
    // Field for field the JSON the service always sent; the text reads the same fields.
    let status = serde_json::to_value(status)?;
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
        if !status["next_attempt_at"].is_null() {
            text.push_str(&format!("next attempt     {}\n", field("next_attempt_at")));
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
        let rtt = match service(paths).ping().await {
            Ok(rtt) => rtt,
            Err(ClientError::Refused(why)) => bail!("ping failed: {why}"),
            Err(e) => return Err(not_running(e)),
        };
        let ms = rtt.as_secs_f64() * 1_000.0;
        if !out.json() {
            println!("heartbeat ack from the cloud: rtt {ms:.3} ms");
        }
        rtts.push(ms);
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

/// One account request to the cloud: through the tunnel service when it runs and is
/// connected, otherwise on a connection of its own. The same message (the same request id)
/// goes either way, so a request the service sent before failing is not applied twice. An
/// `ErrorMsg` reply becomes [`RequestError::Refused`] with its code.
pub(crate) async fn account_request(paths: &Paths, message: Message) -> anyhow::Result<Message> {
    let Some(identity) = Identity::load(&paths.identity_home()?)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let service = service(paths);
    let ours = matches!(service.status().await, Ok(s) if s.device_id == identity.info.device_id);
    let through = if ours {
        service.request(&message).await
    } else {
        Err(ClientError::NotRunning)
    };
    let reply = match through {
        Ok(reply) => {
            tracing::info!("account request sent through the tunnel service");
            reply
        }
        Err(why) => {
            tracing::info!("account request on a connection of its own ({why:#})");
            request(&identity, message).await?
        }
    };
    Ok(answer(reply)?)
}

pub(crate) async fn topup(out: &Output, paths: &Paths, voucher: &str) -> anyhow::Result<()> {
    let message = synesis_proto::message::TopupRequest {
        request_id: new_request_id(),
        voucher: crate::secret_arg::secret_arg(voucher, "voucher")?
            .trim()
            .to_owned(),
    };
    let Message::TopupReply(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a top-up reply");
    };
    let view =
        serde_json::json!({"credited_micro_usd": r.credited.0, "balance_micro_usd": r.balance.0});
    out.report(&view, || {
        format!("credited ${}; balance ${}\n", r.credited, r.balance)
    })?;
    Ok(())
}

/// The account's usage with every charge since `since`, page after page (each reply lists at
/// most `USAGE_CHARGES_MAX` and names its last charge when more follow); the balance is the
/// first page's.
async fn cloud_usage(
    paths: &Paths,
    since: Option<synesis_proto::UnixMillis>,
    group_by: Option<synesis_proto::message::UsageGrouping>,
) -> anyhow::Result<synesis_proto::message::UsageReply> {
    let mut first: Option<synesis_proto::message::UsageReply> = None;
    let mut charges = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut after = None;
    loop {
        let message = synesis_proto::message::UsageRequest {
            request_id: new_request_id(),
            since,
            group_by,
            after,
        };
        let Message::UsageReply(mut page) = account_request(paths, message.into()).await? else {
            bail!("the cloud answered something else than a usage reply");
        };
        let listed = page.charges.len();
        for c in std::mem::take(&mut page.charges) {
            // Pages never overlap: a cloud that repeats itself would be asked forever.
            if !seen.insert(c.request_id) {
                bail!("the cloud listed charge {} twice", c.request_id);
            }
            charges.push(c);
        }
        after = page.next.take();
        first.get_or_insert(page);
        match after {
            None => break,
            Some(_) if listed == 0 => {
                bail!("the cloud sent an empty usage page with more to follow")
            }
            Some(_) => tracing::debug!(listed = charges.len(), "more charges follow"),
        }
    }
    let mut reply = first.context("no usage reply")?;
    if let Some(by) = group_by {
        // Stable: the pages came in the listing's order.
        charges.sort_by_cached_key(|c| synesis_billing::group_key(c, by));
    }
    reply.charges = charges;
    Ok(reply)
}

pub(crate) async fn usage(
    out: &Output,
    paths: &Paths,
    args: &CloudUsageArgs,
) -> anyhow::Result<()> {
    let by = args.by.map(synesis_proto::message::UsageGrouping::from);
    let reply = cloud_usage(paths, args.since, by).await?;
    let view = synesis_billing::UsageView::new(&reply, by)?;
    out.report(&view, || view.text())?;
    Ok(())
}

/// `synesis cloud sync`: this device's charges on the cloud's ledger, reconciled into the
/// local ledger by request id (the cloud is the authority).
pub(crate) async fn sync(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let Some(identity) = Identity::load(&paths.identity_home()?)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let device = identity.info.device_id;
    let r = cloud_usage(paths, None, None).await?;
    let file = paths.ledger_file();
    let report = tokio::task::spawn_blocking(move || {
        let mut ledger = LocalLedger::open(&file)?;
        // This machine's charges: its current identity's, and those of identities it had
        // before a new `cloud login` whose charges it already mirrors.
        let mirrored = ledger.cloud_devices()?;
        let charges = machine_charges(
            r.charges.into_iter().map(CloudCharge::from),
            device,
            &mirrored,
        );
        ledger.reconcile(&charges, unix_now())
    })
    .await
    .context("the local ledger task failed")?
    .map_err(ledger_error)?;
    out.report(&report, || {
        let c = &report.counts;
        let mut text = if report.in_agreement() {
            format!(
                "in agreement: {} charges of this machine on both ledgers\n",
                c.cloud_charges
            )
        } else {
            format!(
                "{} charges on the cloud: {} added here, {} corrected to the cloud's values, {} unchanged; {} here but not on the cloud; {} conflicts\n",
                c.cloud_charges, c.added, c.changed, c.unchanged, c.missing_in_cloud, c.conflicts
            )
        };
        for change in &report.changed {
            text.push_str(&format!(
                "  {} corrected: {}\n",
                change.request_id,
                change.fields.join(", ")
            ));
        }
        for id in &report.missing_in_cloud {
            text.push_str(&format!("  {id} is here but not on the cloud (kept)\n"));
        }
        for conflict in &report.conflicts {
            text.push_str(&format!(
                "  {} not applied: {:?}\n",
                conflict.request_id, conflict.reason
            ));
        }
        text
    })?;
    Ok(())
}

pub(crate) async fn price(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let message = synesis_proto::message::PriceRequest {
        request_id: new_request_id(),
    };
    let Message::PriceReply(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a price reply");
    };
    let prices: Vec<serde_json::Value> = r
        .prices
        .iter()
        .map(|p| serde_json::json!({"model": p.model, "input_micro_usd_per_mtok": p.input_per_mtok.0, "output_micro_usd_per_mtok": p.output_per_mtok.0}))
        .collect();
    let view =
        serde_json::json!({"tier": r.tier.as_str(), "markup_bps": r.markup_bps, "prices": prices});
    out.report(&view, || {
        let mut s = format!(
            "tier {} (markup or fee {} bps)\n",
            r.tier.as_str(),
            r.markup_bps
        );
        for p in &r.prices {
            s.push_str(&format!(
                "  {:<16} ${} in, ${} out per million tokens\n",
                p.model, p.input_per_mtok, p.output_per_mtok
            ));
        }
        s
    })?;
    Ok(())
}

/// `synesis cloud models`: the models the cloud serves to this account, their prices and
/// contexts, and its default (marked `*`; the one `cloud ask` and `ask` use unless told).
pub(crate) async fn models(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let message = synesis_proto::message::PriceRequest {
        request_id: new_request_id(),
    };
    let Message::PriceReply(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a price reply");
    };
    let models: Vec<serde_json::Value> = r
        .served
        .iter()
        .map(|m| {
            serde_json::json!({
                "model": m.model,
                "default": r.default_model.as_deref() == Some(m.model.as_str()),
                "input_micro_usd_per_mtok": m.input_per_mtok.0,
                "output_micro_usd_per_mtok": m.output_per_mtok.0,
                "context_tokens": m.context_tokens,
            })
        })
        .collect();
    let view = serde_json::json!({
        "tier": r.tier.as_str(),
        "markup_bps": r.markup_bps,
        "default_model": r.default_model,
        "models": models,
    });
    out.report(&view, || {
        if r.served.is_empty() {
            return format!(
                "the cloud serves no model to this account (tier {}); ask its operator\n",
                r.tier.as_str()
            );
        }
        let mut s = format!(
            "tier {} (markup or fee {} bps); * is the default\n",
            r.tier.as_str(),
            r.markup_bps
        );
        for m in &r.served {
            let mark = if r.default_model.as_deref() == Some(m.model.as_str()) {
                '*'
            } else {
                ' '
            };
            s.push_str(&format!(
                "{mark} {:<16} ${} in, ${} out per million tokens · context {}\n",
                m.model,
                m.input_per_mtok,
                m.output_per_mtok,
                m.context_tokens
                    .map_or("not known yet".to_owned(), |n| format!("{n} tokens")),
            ));
        }
        s
    })?;
    Ok(())
}

/// `synesis cloud members`: the account's people and their roles (editors and the owner may
/// list them).
pub(crate) async fn members(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let message = synesis_proto::message::MembersRequest {
        request_id: new_request_id(),
    };
    let Message::MembersReply(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a list of members");
    };
    let rows: Vec<serde_json::Value> = r
        .members
        .iter()
        .map(
            |m| serde_json::json!({"name": m.name, "role": role_name(m.role), "joined_at": m.joined_at}),
        )
        .collect();
    out.report(&rows, || {
        let mut s = format!("{:<32}  {:<9}  joined\n", "MEMBER", "ROLE");
        for m in &r.members {
            s.push_str(&format!(
                "{:<32}  {:<9}  {}\n",
                m.name,
                role_name(m.role),
                m.joined_at.to_rfc3339().unwrap_or_default()
            ));
        }
        s
    })?;
    Ok(())
}

/// `synesis cloud invite`: a one-time code for the invitee (the owner's; the cloud checks).
pub(crate) async fn invite(out: &Output, paths: &Paths, args: &InviteArgs) -> anyhow::Result<()> {
    let Some(identity) = Identity::load(&paths.identity_home()?)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let message = synesis_proto::message::InviteCreate {
        request_id: new_request_id(),
        invitee: args.invitee.clone(),
        role: args.role,
        ttl_ms: u64::try_from(args.expires.as_millis()).unwrap_or(u64::MAX),
        quota_tokens: args.quota,
    };
    let Message::InviteCreated(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than an invitation");
    };
    let Some((token_id, secret)) = SetupToken::parse_presented(&r.code) else {
        bail!("the cloud's invitation code is damaged");
    };
    // The code carries what this device dials and trusts, so the invitee reaches the same cloud.
    let code = SetupToken {
        server: identity.info.server.clone(),
        nodes: identity.info.nodes.clone(),
        ca_sha256: synesis_proto::Sha256(
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                &identity.ca_der,
            ))
            .into(),
        ),
        token_id,
        secret,
    }
    .to_string();
    let view = serde_json::json!({
        "code": code,
        "invitee": args.invitee,
        "role": role_name(args.role),
        "quota_tokens": args.quota,
        "expires_at": r.expires_at,
    });
    out.report(&view, || {
        format!(
            "{code}\n(give it to {}: `synesis cloud accept CODE` on their device makes them a {} of {}; it works once, until {})\n",
            args.invitee,
            role_name(args.role),
            identity.info.account,
            r.expires_at.to_rfc3339().unwrap_or_default()
        )
    })?;
    Ok(())
}

/// `synesis cloud members rm NAME` (the owner's).
pub(crate) async fn remove_member(out: &Output, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let message = synesis_proto::message::MemberRemove {
        request_id: new_request_id(),
        name: name.to_owned(),
    };
    let Message::MemberRemoved(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a removal");
    };
    let view = serde_json::json!({"removed": r.name, "devices_revoked": r.devices_revoked});
    out.report(&view, || {
        format!(
            "removed {} from the account; {} of their devices revoked\n",
            r.name, r.devices_revoked
        )
    })?;
    Ok(())
}

/// `synesis cloud handover EMAIL` (the owner's).
pub(crate) async fn offer_handover(out: &Output, paths: &Paths, to: &str) -> anyhow::Result<()> {
    let message = synesis_proto::message::HandoverOffer {
        request_id: new_request_id(),
        to: to.to_owned(),
    };
    let Message::HandoverOffered(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a handover offer");
    };
    let view = serde_json::json!({"offered_to": r.to, "expires_at": r.expires_at});
    out.report(&view, || {
        format!(
            "offered the account to {}: `synesis cloud handover accept` on their device before {} makes them the owner (and you an editor)\n",
            r.to,
            r.expires_at.to_rfc3339().unwrap_or_default()
        )
    })?;
    Ok(())
}

/// `synesis cloud handover accept` (the offered member's device).
pub(crate) async fn accept_handover(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let message = synesis_proto::message::HandoverAccept {
        request_id: new_request_id(),
    };
    let Message::HandoverAccepted(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a handover");
    };
    let view = serde_json::json!({"account": r.account, "former_owner": r.former_owner});
    out.report(&view, || {
        format!(
            "you own {} now; {} is an editor\n",
            r.account, r.former_owner
        )
    })?;
    Ok(())
}

/// `synesis cloud invites` (the owner's): the invitations not yet accepted.
pub(crate) async fn invites(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let message = synesis_proto::message::InvitesRequest {
        request_id: new_request_id(),
    };
    let Message::InvitesReply(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a list of invitations");
    };
    let rows: Vec<serde_json::Value> = r
        .invites
        .iter()
        .map(|i| {
            serde_json::json!({
                "invitee": i.invitee,
                "role": role_name(i.role),
                "quota_tokens": i.quota_tokens,
                "expires_at": i.expires_at,
            })
        })
        .collect();
    out.report(&rows, || {
        if r.invites.is_empty() {
            return "no pending invitations; `synesis cloud invite EMAIL --role ROLE` makes one\n"
                .into();
        }
        let mut s = format!(
            "{:<32}  {:<9}  {:>12}  expires\n",
            "INVITEE", "ROLE", "QUOTA"
        );
        for i in &r.invites {
            s.push_str(&format!(
                "{:<32}  {:<9}  {:>12}  {}\n",
                i.invitee,
                role_name(i.role),
                i.quota_tokens.map_or_else(|| "-".into(), |q| q.to_string()),
                i.expires_at.to_rfc3339().unwrap_or_default()
            ));
        }
        s
    })?;
    Ok(())
}

/// `synesis cloud invites revoke INVITEE` (the owner's).
pub(crate) async fn revoke_invites(
    out: &Output,
    paths: &Paths,
    invitee: &str,
) -> anyhow::Result<()> {
    let message = synesis_proto::message::InviteRevoke {
        request_id: new_request_id(),
        invitee: invitee.to_owned(),
    };
    let Message::InviteRevoked(r) = account_request(paths, message.into()).await? else {
        bail!("the cloud answered something else than a withdrawal");
    };
    let view = serde_json::json!({"invitee": r.invitee, "revoked": r.revoked});
    out.report(&view, || {
        format!(
            "withdrew {} invitation(s) for {}; their codes no longer work\n",
            r.revoked, r.invitee
        )
    })?;
    Ok(())
}

/// A role as people read it.
fn role_name(role: synesis_proto::message::Role) -> &'static str {
    use synesis_proto::message::Role;
    match role {
        Role::Owner => "owner",
        Role::Editor => "editor",
        Role::Commenter => "commenter",
        Role::Viewer => "viewer",
    }
}
