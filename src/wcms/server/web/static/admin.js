// Administration: registration PINs, admins, API keys, settings, the audit log.
"use strict";

(() => {
  const { t, el, api, clear } = W;
  const $ = (id) => document.getElementById(id);
  const me = Number(document.body.dataset.adminId) || null;

  // A secret shown once (a PIN, a generated password, an API key), with a copy button.
  function showSecret(box, label, secret) {
    const code = el("code", { class: "secret", text: secret });
    clear(box).append(
      el(
        "div",
        { class: "once" },
        el("span", { text: label }),
        code,
        el("button", {
          type: "button",
          class: "small",
          text: t("admin.copy"),
          on: { click: () => W.copyText(secret).then(() => W.notice(t("admin.copied"), "ok"), () => W.notice(t("admin.copy_failed"), "error")) },
        }),
        el("p", { class: "muted", text: t("admin.shown_once") }),
      ),
    );
    box.hidden = false;
  }

  function table(headKeys, rows, emptyKey) {
    const body = el("tbody");
    for (const cells of rows) body.append(el("tr", {}, cells.map((c) => el("td", {}, c))));
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: String(headKeys.length), class: "muted", text: t(emptyKey) })));
    return el("table", { class: "list" }, el("thead", {}, el("tr", {}, headKeys.map((k) => el("th", { text: t(k) })))), body);
  }

  function button(label, cls, onClick) {
    return el("button", { type: "button", class: "small " + (cls || ""), text: label, on: { click: onClick } });
  }

  async function run(promise, okText) {
    try {
      const out = await promise;
      if (okText) W.notice(okText, "ok");
      return out;
    } catch (err) {
      W.notice(W.errorText(err), "error");
      return null;
    }
  }

  // ------------------------------------------------------------ PINs

  async function loadPins() {
    const data = await api("GET", "/api/pins");
    const rows = data.pins.map((p) => [
      el("code", { text: p.hint }),
      t(p.multi_use ? "admin.pin_multi" : "admin.pin_single") + (p.auto_approve ? " · " + t("admin.pin_approve") : ""),
      String(p.uses),
      W.when(p.expires_at),
      el("span", {
        class: "pill " + (p.live ? "live" : "dead"),
        text: t(p.revoked ? "admin.revoked" : p.live ? "admin.live" : "admin.expired"),
        title: t("admin.wrong_tries", { n: p.wrong_tries }),
      }),
      p.live
        ? button(t("admin.revoke"), "danger", async () => {
            if (await W.confirmDialog(t("admin.revoke_pin"), p.hint, t("admin.revoke"))) {
              await run(api("DELETE", "/api/pins/" + p.id), t("admin.done"));
              loadPins();
            }
          })
        : "",
    ]);
    clear($("pins")).append(table(["admin.pin", "admin.kind", "admin.uses", "admin.expires", "admin.state", ""], rows, "admin.none"));
  }

  $("pin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = W.formData(ev.target);
    const made = await run(api("POST", "/api/pins", body));
    if (made) {
      showSecret($("pin-new"), t("admin.new_pin"), made.pin);
      loadPins();
    }
  });

  // ------------------------------------------------------------ admins

  async function loadAdmins() {
    const data = await api("GET", "/api/admins");
    const rows = data.admins.map((a) => [
      a.username + (a.id === me ? " " + t("admin.you") : ""),
      el("span", { class: "pill " + (a.active ? "live" : "dead"), text: t(a.active ? "admin.active" : "admin.disabled") }),
      W.when(a.last_login_at),
      el(
        "span",
        { class: "buttons-inline" },
        a.id === me
          ? ""
          : button(t(a.active ? "admin.disable" : "admin.enable"), a.active ? "danger" : "", async () => {
              if (a.active && !(await W.confirmDialog(t("admin.disable_title", { name: a.username }), t("admin.disable_text"), t("admin.disable")))) return;
              await run(api("PATCH", "/api/admins/" + a.id, { active: !a.active }), t("admin.done"));
              loadAdmins();
            }),
        button(t("admin.reset_password"), "", async () => {
          if (!(await W.confirmDialog(t("admin.reset_title", { name: a.username }), t("admin.reset_text"), t("admin.reset_password")))) return;
          const out = await run(api("POST", "/api/admins/" + a.id + "/password", {}));
          if (out) showSecret($("admin-new"), t("admin.new_password_for", { name: a.username }), out.password);
        }),
      ),
    ]);
    clear($("admins")).append(table(["admin.username", "admin.state", "admin.last_login", ""], rows, "admin.none"));
  }

  $("admin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = W.formData(ev.target);
    if (!body.password) delete body.password;
    const made = await run(api("POST", "/api/admins", body), t("admin.done"));
    if (made) {
      ev.target.reset();
      if (made.password) showSecret($("admin-new"), t("admin.new_password_for", { name: made.username }), made.password);
      loadAdmins();
    }
  });

  // ------------------------------------------------------------ API keys

  async function loadKeys() {
    const data = await api("GET", "/api/apikeys");
    const rows = data.apikeys.map((k) => [
      k.name,
      el("code", { text: k.prefix + "…" }),
      k.owner_id === null
        ? el("span", { class: "muted", text: t("admin.key_org") })
        : el("span", { text: k.owner === null ? "#" + k.owner_id : k.owner }),
      W.when(k.last_used_at),
      el("span", { class: "pill " + (k.revoked ? "dead" : "live"), text: t(k.revoked ? "admin.revoked" : "admin.active") }),
      k.revoked
        ? ""
        : button(t("admin.revoke"), "danger", async () => {
            if (await W.confirmDialog(t("admin.revoke_key"), k.name, t("admin.revoke"))) {
              await run(api("DELETE", "/api/apikeys/" + k.id), t("admin.done"));
              loadKeys();
            }
          }),
    ]);
    clear($("keys")).append(table(["admin.key_name", "admin.key_prefix", "admin.key_owner", "admin.last_used", "admin.state", ""], rows, "admin.none"));
  }

  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const made = await run(api("POST", "/api/apikeys", W.formData(ev.target)));
    if (made) {
      ev.target.reset();
      showSecret($("key-new"), t("admin.new_key"), made.key);
      loadKeys();
    }
  });

  // ------------------------------------------------------------ settings and audit

  async function loadSettings() {
    const data = await api("GET", "/api/settings");
    $("presence-mode").value = data.presence_mode;
    const tm = data.timing;
    $("timing").textContent = t("admin.timing", { hb: tm.heartbeat_interval, off: tm.offline_after });
  }

  $("settings-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    await run(api("PUT", "/api/settings", { presence_mode: $("presence-mode").value }), t("admin.saved"));
    loadSettings();
  });

  async function loadAudit() {
    const data = await api("GET", "/api/audit?limit=200");
    const rows = data.entries.map((e) => [
      W.when(e.at),
      e.actor,
      el("code", { text: e.action }),
      e.target || "",
      el("span", { class: "details", text: Object.keys(e.details || {}).length ? JSON.stringify(e.details) : "" }),
      e.ip || "",
    ]);
    clear($("audit")).append(table(["admin.when", "admin.actor", "admin.action", "admin.target", "admin.details", "admin.ip"], rows, "admin.none"));
  }
  $("audit-refresh").addEventListener("click", loadAudit);

  async function loadAll() {
    await Promise.all([loadPins(), loadAdmins(), loadKeys(), loadSettings(), loadAudit()]);
    document.body.dataset.ready = "1";
  }
  loadAll().catch((err) => W.notice(W.errorText(err), "error"));
})();
