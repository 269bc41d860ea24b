// The PC page: state, load with a chart, hardware, processes, power timeline, commands.
"use strict";

(() => {
  const { t, el, api, clear, svg } = W;
  const pcId = Number(document.body.dataset.pcId);
  const DAYS = 7;
  let pc = null;
  let history = []; // [{at, cpu_percent, ram_percent}]
  let processFilter = "";

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ summary and load

  function renderSummary() {
    $("pc-host").textContent = pc.hostname;
    document.title = pc.hostname + " · WCMS";
    const status = W.statusOf(pc.state, pc.reason);
    const box = clear($("pc-status"));
    box.append(W.statusBadge(status, pc.since));
    if (pc.reason) box.append(el("span", { class: "muted reason", text: t("pc.reason", { reason: t("reason." + pc.reason) }) }));
    const facts = clear($("pc-facts"));
    const place = pc.room ? pc.room + (pc.seat ? " · " + t("pc.seat_at", { row: pc.seat.row, col: pc.seat.col }) : "") : t("pc.unassigned");
    const rows = [
      ["pc.user", pc.current_user || "—"],
      ["pc.ip", pc.ip_address || "—"],
      ["pc.place", place],
      ["pc.last_seen", W.when(pc.last_seen)],
      ["pc.client_version", pc.client_version || "—"],
      ["pc.registered", W.when(pc.registered_at)],
      ["pc.approved", t(pc.approved ? "pc.approved_yes" : "pc.approved_no")],
      ["pc.reregister", pc.reregister_until ? t("pc.reregister_until", { when: W.when(pc.reregister_until) }) : t("pc.reregister_none")],
    ];
    for (const [key, value] of rows) facts.append(el("dt", { text: t(key) }), el("dd", { text: value }));
    renderTrust();
    if (pc.room_id) {
      const back = $("back-to-room");
      back.href = "/rooms/" + pc.room_id;
      back.textContent = t("pc.back_to_room", { room: pc.room });
      back.hidden = false;
    }
  }

  // Approval (secret-carrying commands) and re-registration without the token: admin actions.
  function renderTrust() {
    const box = clear($("pc-trust"));
    if (!pc.approved) {
      box.append(
        el("button", {
          type: "button",
          id: "pc-approve",
          text: t("pc.approve"),
          on: { click: () => trustAction("approve", t("pc.approve_confirm", { host: pc.hostname }), () => t("pc.approved_done")) },
        }),
      );
    }
    box.append(
      el("button", {
        type: "button",
        id: "pc-allow-reregister",
        class: "act-danger",
        text: t("pc.allow_reregister"),
        on: {
          click: () =>
            trustAction("allow-reregister", t("pc.allow_reregister_confirm", { host: pc.hostname }), (answer) =>
              t("pc.allow_reregister_done", { when: W.when(answer.reregister_until) }),
            ),
        },
      }),
    );
  }

  async function trustAction(action, question, done) {
    if (!window.confirm(question)) return;
    const box = $("pc-trust");
    try {
      const answer = await api("POST", "/api/pcs/" + pcId + "/" + action);
      await load();
      box.append(el("p", { class: "muted", role: "status", text: done(answer) }));
    } catch (err) {
      box.append(el("p", { class: "warn", role: "alert", text: W.errorText(err) }));
    }
  }

  function gauge(name, value, detail) {
    const bar = el("i", { class: W.loadClass(value) });
    bar.style.width = value === null || value === undefined ? "0" : Math.min(100, value) + "%";
    return el(
      "div",
      { class: "gauge" },
      el("span", { class: "gname", text: name }),
      el("span", { class: "bar bar-lg" }, bar),
      el("span", { class: "num", text: W.pct(value) }),
      detail ? el("span", { class: "muted", text: detail }) : null,
    );
  }

  function renderLoad() {
    const box = clear($("pc-load"));
    const m = pc.metrics || {};
    const online = pc.state === "online";
    const hw = pc.hardware || {};
    box.append(
      gauge(t("load.cpu"), online ? pc.cpu_percent : null),
      gauge(t("load.ram"), online ? pc.ram_percent : null, m.ram_used ? W.bytes(m.ram_used) + " / " + W.bytes(hw.ram_total) : null),
    );
    for (const d of m.disks || []) {
      const used = d.total ? (100 * d.used) / d.total : null;
      box.append(gauge(t("load.disk", { mount: d.mount }), used, W.bytes(d.used) + " / " + W.bytes(d.total)));
    }
    if (!online) box.append(el("p", { class: "muted", text: t("pc.offline_load") }));
    renderChart();
  }

  // A line chart of CPU and RAM over the last 24 h, drawn as SVG.
  function renderChart() {
    const box = clear($("pc-chart"));
    const W_ = 600;
    const H = 140;
    const pad = { l: 34, r: 8, t: 8, b: 20 };
    const chart = svg("svg", { viewBox: "0 0 " + W_ + " " + H, class: "chart", role: "img", "aria-label": t("pc.chart") });
    const end = Date.now();
    const start = end - 24 * 3600 * 1000;
    const x = (ms) => pad.l + ((ms - start) / (end - start)) * (W_ - pad.l - pad.r);
    const y = (v) => pad.t + (1 - v / 100) * (H - pad.t - pad.b);
    for (const v of [0, 50, 100]) {
      chart.append(svg("line", { x1: pad.l, x2: W_ - pad.r, y1: y(v), y2: y(v), class: "grid" }));
      const label = svg("text", { x: pad.l - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = v + "%";
      chart.append(label);
    }
    for (const h of [24, 18, 12, 6, 0]) {
      const label = svg("text", { x: x(end - h * 3600 * 1000), y: H - 4, class: "axis", "text-anchor": "middle" });
      label.textContent = h ? "-" + h + "h" : t("pc.now");
      chart.append(label);
    }
    for (const [key, cls] of [["ram_percent", "line-ram"], ["cpu_percent", "line-cpu"]]) {
      const pts = history.filter((s) => s[key] !== null && Date.parse(s.at) >= start).map((s) => x(Date.parse(s.at)).toFixed(1) + "," + y(s[key]).toFixed(1));
      if (pts.length) chart.append(svg("polyline", { points: pts.join(" "), class: cls }));
    }
    box.append(
      chart,
      el("div", { class: "legend" }, el("span", { class: "key-cpu", text: t("load.cpu") }), el("span", { class: "key-ram", text: t("load.ram") })),
    );
    if (!history.length) box.append(el("p", { class: "muted", text: t("pc.no_history") }));
  }

  function renderHardware() {
    const hw = pc.hardware || {};
    const box = clear($("pc-hardware"));
    const os = [hw.os_name, hw.os_edition, hw.os_version].filter(Boolean).join(" ");
    const rows = [
      ["hw.os", os || "—"],
      ["hw.cpu", hw.cpu_model || "—"],
      ["hw.cores", hw.cpu_cores ? t("hw.cores_threads", { cores: hw.cpu_cores, threads: hw.cpu_threads || hw.cpu_cores }) : "—"],
      ["hw.ram", W.bytes(hw.ram_total)],
      ["hw.mac", (hw.mac_addresses || []).join(", ") || "—"],
      ["hw.machine_id", pc.machine_id],
    ];
    for (const [key, value] of rows) box.append(el("dt", { text: t(key) }), el("dd", { text: value }));
    for (const d of hw.disks || []) {
      box.append(el("dt", { text: t("hw.disk", { mount: d.mount }) }), el("dd", { text: W.bytes(d.total) + (d.fstype ? " · " + d.fstype : "") }));
    }
  }

  function renderProcesses() {
    const list = clear($("pc-processes"));
    const names = ((pc.metrics && pc.metrics.processes) || []).slice().sort((a, b) => a.localeCompare(b));
    const shown = names.filter((n) => n.toLowerCase().includes(processFilter));
    $("process-count").textContent = t("pc.process_count", { n: names.length });
    for (const name of shown.slice(0, 500)) {
      list.append(
        el(
          "li",
          {},
          el("span", { class: "pname", text: name }),
          el("button", {
            type: "button",
            class: "small act-danger",
            text: t("cmd.kill"),
            on: { click: () => Actions.open("kill", target(), { name }) },
          }),
        ),
      );
    }
    if (!names.length) list.append(el("li", { class: "muted", text: t("pc.no_processes") }));
  }

  // ------------------------------------------------------------ power timeline

  function renderTimeline() {
    const events = pc.timeline || [];
    const box = clear($("pc-timeline"));
    const end = Date.now();
    const start = end - DAYS * 86400 * 1000;
    const W_ = 1200;
    const H = 46;
    const chart = svg("svg", { viewBox: "0 0 " + W_ + " " + H, class: "timeline", role: "img", "aria-label": t("pc.timeline") });
    const x = (ms) => ((Math.max(ms, start) - start) / (end - start)) * W_;
    // Before the first event in range, the PC was in the state that event left.
    // (unknown before the first event's from-state; the reason before it is out of range).
    let status = W.statusOf(pc.state, pc.reason);
    if (events.length) status = events[0].from === null ? "unknown" : events[0].from === "online" ? "online" : "off";
    let from = start;
    const segments = [];
    for (const e of events) {
      const at = Date.parse(e.at);
      segments.push({ from, to: at, status });
      status = W.statusOf(e.to, e.reason);
      from = at;
    }
    segments.push({ from, to: end, status });
    for (const s of segments) {
      if (s.to <= start || s.status === "unknown") continue;
      const rect = svg("rect", { x: x(s.from), y: 6, width: Math.max(1, x(s.to) - x(s.from)), height: 20, class: "seg st-" + s.status });
      const title = svg("title", {});
      title.textContent = t("status." + s.status) + ": " + W.when(new Date(s.from).toISOString()) + " – " + W.when(new Date(s.to).toISOString());
      rect.append(title);
      chart.append(rect);
    }
    for (let d = DAYS; d >= 0; d -= 1) {
      const at = end - d * 86400 * 1000;
      chart.append(svg("line", { x1: x(at), x2: x(at), y1: 4, y2: 30, class: "tick" }));
      const label = svg("text", { x: Math.min(W_ - 12, Math.max(12, x(at))), y: 42, class: "axis", "text-anchor": "middle" });
      label.textContent = d ? "-" + d + t("time.d_short") : t("pc.now");
      chart.append(label);
    }
    box.append(chart);
    const legend = el("div", { class: "legend" });
    for (const s of W.STATUSES) legend.append(el("span", { class: "lg st-" + s }, el("span", { class: "ico", text: W.ICONS[s] }), " ", t("status." + s)));
    box.append(legend);

    const table = el("table", { class: "events" }, el("thead", {}, el("tr", {}, el("th", { text: t("pc.when") }), el("th", { text: t("pc.change") }), el("th", { text: t("pc.why") }))));
    const body = el("tbody");
    for (const e of events.slice().reverse().slice(0, 200)) {
      body.append(
        el(
          "tr",
          {},
          el("td", { text: W.when(e.at) }),
          el("td", {}, W.statusBadge(W.statusOf(e.to, e.reason))),
          el("td", { text: t("reason." + e.reason) }),
        ),
      );
    }
    if (!events.length) body.append(el("tr", {}, el("td", { colspan: "3", class: "muted", text: t("pc.no_events") })));
    table.append(body);
    box.append(table);
  }

  // ------------------------------------------------------------ command history

  async function loadCommands() {
    const box = $("pc-commands");
    let data;
    try {
      data = await api("GET", "/api/pcs/" + pcId + "/commands");
    } catch (err) {
      clear(box).append(el("p", { class: "muted", text: err.status === 404 ? t("cmd.unavailable") : W.errorText(err) }));
      return;
    }
    const list = data.commands || [];
    const table = el(
      "table",
      { class: "events" },
      el("thead", {}, el("tr", {}, ...["pc.when", "pc.command", "pc.cmd_status", "pc.cmd_result"].map((k) => el("th", { text: t(k) })))),
    );
    const body = el("tbody");
    for (const c of list) {
      const result = [c.exit_code !== null && c.exit_code !== undefined ? t("batch.exit", { code: c.exit_code }) : "", c.error || "", (c.stdout || "").slice(0, 300)].filter(Boolean).join(" · ");
      body.append(
        el(
          "tr",
          {},
          el("td", { text: W.when(c.queued_at || c.created_at) }),
          el("td", {}, el("b", { text: t("cmd." + c.type) }), " ", el("code", { text: JSON.stringify(c.args || {}) })),
          el("td", {}, el("span", { class: "cmd-status cs-" + c.status, text: t("cmdstatus." + c.status) })),
          el("td", { class: "result", text: result }),
        ),
      );
    }
    if (!list.length) body.append(el("tr", {}, el("td", { colspan: "4", class: "muted", text: t("pc.no_commands") })));
    table.append(body);
    clear(box).append(table);
  }

  // ------------------------------------------------------------ data and live

  function target() {
    return { target: { pc_ids: [pcId] }, count: 1, label: pc ? pc.hostname : "#" + pcId };
  }

  async function load() {
    pc = await api("GET", "/api/pcs/" + pcId + "?days=" + DAYS);
    history = pc.history || [];
    renderSummary();
    renderLoad();
    renderHardware();
    renderProcesses();
    renderTimeline();
    loadCommands();
    document.body.dataset.ready = "1";
  }

  function onMessage(msg) {
    if (msg.type === "presence" && msg.pc_id === pcId) {
      load();
    } else if (msg.type === "metrics") {
      const m = msg.pcs.find((p) => p.pc_id === pcId);
      if (!m || !pc) return;
      Object.assign(pc, { cpu_percent: m.cpu_percent, ram_percent: m.ram_percent, current_user: m.current_user, hostname: m.hostname });
      history.push({ at: m.at, cpu_percent: m.cpu_percent, ram_percent: m.ram_percent });
      renderSummary();
      renderLoad();
    } else if (msg.type === "pc_deleted" && msg.pc_id === pcId) {
      location.assign("/");
    } else if (msg.type === "command") {
      Actions.message(msg);
      if (msg.pc_id === pcId) loadCommands();
    }
  }

  $("process-filter").addEventListener("input", (ev) => {
    processFilter = ev.target.value.toLowerCase();
    if (pc) renderProcesses();
  });
  Actions.toolbar($("actions"), target);
  W.live({ resync: load, message: onMessage });
})();
