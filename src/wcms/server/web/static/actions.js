// Commands: the action buttons, the dialog that asks for arguments (and confirms destructive
// ones), and the live per-PC progress of a batch. Used by the room view and the PC page.
"use strict";

const Actions = (() => {
  const { t, el, api, clear } = W;

  const POWER = [
    { name: "delay", kind: "number", min: 0, max: 86400, value: 0 },
    { name: "message", kind: "text", max: 500 },
  ];
  const ACCOUNT_FIELDS = {
    account_create: ["username", "password", "full_name", "language"],
    account_password: ["username", "password"],
    account_delete: ["username"],
  };
  const FIELD = {
    username: { name: "username", kind: "text", required: true, max: 20 },
    password: { name: "password", kind: "password", required: true, max: 127 },
    full_name: { name: "full_name", kind: "text", max: 100 },
    language: { name: "language", kind: "text", placeholder: "ko-KR" },
  };
  // type -> {danger: asks for confirmation, fields}
  const TYPES = {
    shutdown: { danger: true, fields: POWER },
    restart: { danger: true, fields: POWER },
    logoff: { danger: true, fields: [] },
    lock: { danger: false, fields: [] },
    message: {
      danger: false,
      fields: [
        { name: "title", kind: "text", max: 100 },
        { name: "text", kind: "textarea", required: true, max: 1000 },
      ],
    },
    run: {
      danger: true,
      fields: [
        { name: "command", kind: "textarea", required: true, max: 8000 },
        { name: "timeout", kind: "number", min: 1, max: 3600, value: 300 },
      ],
    },
    install: { danger: false, fields: [{ name: "package", kind: "text", required: true, max: 128 }] },
    uninstall: { danger: true, fields: [{ name: "package", kind: "text", required: true, max: 128 }] },
    kill: { danger: true, fields: [{ name: "name", kind: "text", required: true, max: 255 }] },
    accounts: { danger: true, fields: [] }, // the dialog picks one of the account_* types
  };
  const BUTTONS = ["shutdown", "restart", "logoff", "message", "run", "install", "kill", "accounts", "lock"];
  const FINAL = new Set(["succeeded", "failed", "expired", "cancelled"]);

  // toolbar(container, target) where target() answers {target, count, label} or null.
  function toolbar(container, target) {
    clear(container);
    for (const type of BUTTONS) {
      container.append(
        el("button", {
          type: "button",
          class: "act" + (TYPES[type].danger ? " act-danger" : ""),
          data: { action: type },
          text: t("cmd." + type),
          on: { click: () => open(type, target()) },
        }),
      );
    }
  }

  function fieldInput(spec, value) {
    const id = "arg-" + spec.name;
    let input;
    if (spec.kind === "textarea") {
      input = el("textarea", { id, name: spec.name, rows: 3, maxlength: spec.max, required: spec.required });
    } else {
      input = el("input", {
        id,
        name: spec.name,
        type: spec.kind,
        min: spec.min,
        max: spec.kind === "number" ? spec.max : null,
        maxlength: spec.kind === "number" ? null : spec.max,
        required: spec.required,
        placeholder: spec.placeholder,
        autocomplete: spec.kind === "password" ? "new-password" : "off",
      });
    }
    if (value !== undefined && value !== null) input.value = String(value);
    else if (spec.value !== undefined) input.value = String(spec.value);
    return el("label", { for: id }, el("span", { text: t("arg." + spec.name) }), input);
  }

  function open(type, target, prefill) {
    if (!target || !target.count) {
      W.notice(t("cmd.no_target"), "error");
      return;
    }
    const fieldsBox = el("div", { class: "fields" });
    let kind = type;
    const accountSelect =
      type === "accounts"
        ? el(
            "select",
            { name: "_kind", id: "arg-kind" },
            Object.keys(ACCOUNT_FIELDS).map((k) => el("option", { value: k, text: t("cmd." + k) })),
          )
        : null;

    function renderFields() {
      clear(fieldsBox);
      const specs = type === "accounts" ? ACCOUNT_FIELDS[kind].map((n) => FIELD[n]) : TYPES[type].fields;
      for (const spec of specs) fieldsBox.append(fieldInput(spec, prefill ? prefill[spec.name] : undefined));
    }
    if (accountSelect) {
      kind = accountSelect.value;
      accountSelect.addEventListener("change", () => {
        kind = accountSelect.value;
        renderFields();
      });
    }
    renderFields();

    const danger = TYPES[type].danger;
    const whenOnline = el("input", { type: "checkbox", name: "run_when_online", id: "arg-when-online" });
    const form = el(
      "form",
      { method: "dialog", class: "action-form" },
      el("h2", { text: t("cmd." + type) }),
      el("p", { class: "target", text: t("cmd.target", { target: target.label, n: target.count }) }),
      accountSelect ? el("label", { for: "arg-kind" }, el("span", { text: t("arg.kind") }), accountSelect) : null,
      fieldsBox,
      el("label", { class: "check", for: "arg-when-online" }, whenOnline, el("span", { text: t("arg.run_when_online") })),
      danger ? el("p", { class: "warn", text: t("cmd.confirm_danger", { n: target.count }) }) : null,
      el(
        "div",
        { class: "buttons" },
        el("button", { type: "button", value: "cancel", class: "secondary", text: t("action.cancel"), on: { click: () => dialog.close() } }),
        el("button", { type: "submit", value: "send", class: danger ? "danger" : "primary", text: t("cmd.send") }),
      ),
    );
    const dialog = el("dialog", { class: "action-dialog", data: { type } }, form);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const args = {};
      for (const field of fieldsBox.querySelectorAll("input, textarea")) {
        if (field.value === "") continue;
        args[field.name] = field.type === "number" ? Number(field.value) : field.value;
      }
      const body = { type: kind, args, target: target.target };
      if (whenOnline.checked) body.run_when_online = true;
      try {
        const batch = await api("POST", "/api/commands", body);
        dialog.close();
        progress(batch);
      } catch (err) {
        W.notice(err.status === 404 ? t("cmd.unavailable") : W.errorText(err), "error");
      }
    });
    dialog.addEventListener("close", () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
  }

  // ------------------------------------------------------------ batch progress

  let current = null; // {id, rows: Map(pc_id -> {row, status})}

  function batchId(data) {
    if (!data) return null;
    if (data.batch && data.batch.id !== undefined) return data.batch.id;
    return data.batch_id !== undefined ? data.batch_id : data.id;
  }

  function commandsOf(data) {
    if (Array.isArray(data.commands)) return data.commands;
    if (data.batch && Array.isArray(data.batch.commands)) return data.batch.commands;
    return [];
  }

  function progress(data) {
    const panel = document.getElementById("batch");
    if (!panel) return;
    const id = batchId(data);
    panel.hidden = false;
    clear(panel);
    const list = el("ul", { class: "batch-rows" });
    const head = el("h2", { text: t("batch.title", { id }) });
    const summary = el("p", { class: "batch-summary" });
    const cancel = el("button", {
      type: "button",
      class: "secondary",
      text: t("batch.cancel"),
      on: { click: () => api("POST", "/api/batches/" + id + "/cancel").then(refresh, (e) => W.notice(W.errorText(e), "error")) },
    });
    panel.append(head, summary, cancel, list);
    current = { id, rows: new Map(), list, summary, cancel };
    apply(data);
    refresh();
  }

  function refresh() {
    if (!current) return;
    const id = current.id;
    api("GET", "/api/batches/" + id).then(
      (data) => {
        if (current && current.id === id) apply(data);
      },
      () => undefined,
    );
  }

  function apply(data) {
    for (const cmd of commandsOf(data)) update(cmd);
    summarise();
  }

  function update(cmd) {
    let entry = current.rows.get(cmd.pc_id);
    if (!entry) {
      const status = el("span", { class: "cmd-status" });
      const host = el("a", { href: "/pcs/" + cmd.pc_id, class: "host", text: cmd.hostname || "#" + cmd.pc_id });
      const detail = el("span", { class: "cmd-detail" });
      const row = el("li", { data: { pc: cmd.pc_id } }, host, status, detail);
      current.list.append(row);
      entry = { row, status, detail, host };
      current.rows.set(cmd.pc_id, entry);
    }
    if (cmd.hostname) entry.host.textContent = cmd.hostname;
    if (cmd.status) {
      entry.row.dataset.status = cmd.status;
      entry.status.className = "cmd-status cs-" + cmd.status;
      entry.status.textContent = t("cmdstatus." + cmd.status);
    }
    const bits = [];
    if (cmd.exit_code !== null && cmd.exit_code !== undefined) bits.push(t("batch.exit", { code: cmd.exit_code }));
    if (cmd.error) bits.push(cmd.error);
    if (cmd.stdout) bits.push(cmd.stdout.slice(0, 200));
    entry.detail.textContent = bits.join(" · ");
  }

  function summarise() {
    const counts = {};
    let done = 0;
    for (const { row } of current.rows.values()) {
      const s = row.dataset.status || "queued";
      counts[s] = (counts[s] || 0) + 1;
      if (FINAL.has(s)) done += 1;
    }
    const parts = Object.entries(counts).map(([s, n]) => t("cmdstatus." + s) + " " + n);
    current.summary.textContent = t("batch.progress", { done, n: current.rows.size }) + " — " + parts.join(", ");
    current.cancel.hidden = done === current.rows.size;
  }

  // A bus message about a command: update its row if it belongs to the batch on screen.
  function message(msg) {
    if (msg.type !== "command" || !current) return;
    if (String(msg.batch_id) !== String(current.id)) return;
    update(msg);
    summarise();
    if (msg.status && FINAL.has(msg.status)) setTimeout(refresh, 300); // fetch output too
  }

  return { toolbar, open, progress, message, TYPES };
})();
