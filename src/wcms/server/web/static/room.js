// The room view: the seat grid, live. Click or drag to select PCs, then act on them.
"use strict";

(() => {
  const { t, el, api, clear } = W;
  const roomId = Number(document.body.dataset.roomId);
  const grid = document.getElementById("grid");
  const gridWrap = document.getElementById("grid-wrap");
  const countsBox = document.getElementById("counts");
  const unseatedBox = document.getElementById("unseated");
  const unassignedBox = document.getElementById("unassigned");
  const selInfo = document.getElementById("selection-info");

  let room = null;
  const pcs = new Map(); // id -> pc summary (from the API, then patched by live messages)
  const seats = new Map(); // id -> {root, ico, host, label, since, user, cpu, ram, cpuText, ramText}
  const selected = new Set();
  let firstRender = true;

  // ------------------------------------------------------------ rendering

  function seatNode(pc, extraClass) {
    const parts = {
      ico: el("span", { class: "ico", "aria-hidden": "true" }),
      host: el("a", { class: "host", href: "/pcs/" + pc.id }),
      label: el("span", { class: "label" }),
      since: el("span", { class: "since" }),
      user: el("span", { class: "user" }),
      cpu: el("i"),
      ram: el("i"),
      cpuText: el("span", { class: "num" }),
      ramText: el("span", { class: "num" }),
    };
    const place = pc.seat ? el("span", { class: "place", text: pc.seat.row + "-" + pc.seat.col }) : null;
    parts.root = el(
      "div",
      { class: "seat " + (extraClass || ""), data: { pc: pc.id }, tabindex: "0", "aria-pressed": "false" },
      el("div", { class: "seat-head" }, parts.ico, parts.host, place),
      el("div", { class: "seat-state" }, parts.label, " ", parts.since),
      el("div", { class: "seat-user", title: t("pc.user") }, parts.user),
      el(
        "div",
        { class: "loads" },
        el("span", { class: "lname", text: t("load.cpu") }),
        el("span", { class: "bar" }, parts.cpu),
        parts.cpuText,
        el("span", { class: "lname", text: t("load.ram") }),
        el("span", { class: "bar" }, parts.ram),
        parts.ramText,
      ),
    );
    seats.set(pc.id, parts);
    paint(pc);
    return parts.root;
  }

  function paint(pc) {
    const parts = seats.get(pc.id);
    if (!parts) return;
    const status = W.statusOf(pc.state, pc.reason);
    pc.status = status;
    const root = parts.root;
    const keep = root.className.split(" ").filter((c) => !c.startsWith("st-"));
    keep.push("st-" + status);
    root.className = keep.join(" ");
    root.dataset.status = status;
    root.title = pc.hostname + " — " + t("status." + status) + (pc.reason ? " (" + t("reason." + pc.reason) + ")" : "");
    parts.ico.textContent = W.ICONS[status];
    parts.host.textContent = pc.hostname;
    parts.label.textContent = t("status." + status);
    parts.since.dataset.since = pc.since || "";
    parts.since.textContent = W.ago(pc.since);
    parts.user.textContent = pc.current_user || "—";
    const online = status === "online";
    setBar(parts.cpu, parts.cpuText, online ? pc.cpu_percent : null);
    setBar(parts.ram, parts.ramText, online ? pc.ram_percent : null);
  }

  function setBar(bar, text, value) {
    bar.style.width = value === null || value === undefined ? "0" : Math.min(100, value) + "%";
    bar.className = W.loadClass(value);
    text.textContent = W.pct(value);
  }

  function render(roomData, pcList, unassigned) {
    room = roomData;
    pcs.clear();
    seats.clear();
    document.getElementById("room-name").textContent = room.name;
    document.title = room.name + " · WCMS";
    const bySeat = new Map();
    const unseated = [];
    for (const pc of pcList) {
      pcs.set(pc.id, pc);
      if (pc.seat) bySeat.set(pc.seat.row + ":" + pc.seat.col, pc);
      else unseated.push(pc);
    }
    const frag = document.createDocumentFragment();
    for (let r = 1; r <= room.rows; r += 1) {
      for (let c = 1; c <= room.cols; c += 1) {
        const pc = bySeat.get(r + ":" + c);
        frag.append(
          pc
            ? seatNode(pc)
            : el("div", { class: "seat empty", data: { row: r, col: c } }, el("span", { class: "place", text: r + "-" + c }), el("span", { class: "empty-label", text: t("room.empty_seat") })),
        );
      }
    }
    grid.style.gridTemplateColumns = "repeat(" + room.cols + ", minmax(var(--seat-w), 1fr))";
    clear(grid).append(frag);
    listInto(unseatedBox, unseated, "room.no_unseated");
    for (const pc of unassigned) pcs.set(pc.id, pc);
    listInto(unassignedBox, unassigned, "room.no_unassigned");
    for (const id of [...selected]) if (!seats.has(id)) selected.delete(id);
    for (const id of selected) mark(id, true);
    recount();
    if (firstRender) {
      firstRender = false;
      document.body.dataset.renderedMs = String(Math.round(performance.now()));
      // The frame after this one is the first with the grid painted.
      requestAnimationFrame(() => setTimeout(() => (document.body.dataset.paintedMs = String(Math.round(performance.now()))), 0));
    }
    document.body.dataset.ready = "1";
  }

  function listInto(box, list, emptyKey) {
    const frag = document.createDocumentFragment();
    for (const pc of list) frag.append(seatNode(pc, "card"));
    clear(box).append(frag);
    if (!list.length) box.append(el("p", { class: "muted", text: t(emptyKey) }));
  }

  function inRoom(pc) {
    return room && pc.room_id === room.id;
  }

  function recount() {
    const counts = Object.fromEntries(W.STATUSES.map((s) => [s, 0]));
    let total = 0;
    for (const pc of pcs.values()) {
      if (!inRoom(pc)) continue;
      counts[W.statusOf(pc.state, pc.reason)] += 1;
      total += 1;
    }
    clear(countsBox);
    countsBox.append(el("span", { class: "count total" }, el("b", { text: String(total) }), " ", t("room.pcs")));
    for (const s of W.STATUSES) {
      countsBox.append(
        el(
          "span",
          { class: "count st-" + s + (counts[s] ? "" : " zero"), data: { status: s } },
          el("span", { class: "ico", "aria-hidden": "true", text: W.ICONS[s] }),
          el("b", { text: String(counts[s]) }),
          " ",
          t("status." + s),
        ),
      );
    }
  }

  // ------------------------------------------------------------ live

  async function load() {
    const [data, un] = await Promise.all([api("GET", "/api/rooms/" + roomId), api("GET", "/api/pcs/unassigned")]);
    render(data.room, data.pcs, un.pcs);
  }

  function onMessage(msg) {
    if (msg.type === "presence") {
      const pc = pcs.get(msg.pc_id);
      if (!pc) {
        stream.resync(); // a PC we have not seen: registered just now
        return;
      }
      pc.state = msg.state;
      pc.reason = msg.reason;
      pc.since = msg.since;
      paint(pc);
      recount();
    } else if (msg.type === "metrics") {
      for (const m of msg.pcs) {
        const pc = pcs.get(m.pc_id);
        if (!pc) continue;
        Object.assign(pc, { cpu_percent: m.cpu_percent, ram_percent: m.ram_percent, current_user: m.current_user, hostname: m.hostname });
        paint(pc);
      }
    } else if (msg.type === "layout" || msg.type === "pc_deleted") {
      stream.resync();
    } else if (msg.type === "command") {
      Actions.message(msg);
    }
  }

  // ------------------------------------------------------------ selection

  function mark(id, on) {
    const parts = seats.get(id);
    if (!parts) return;
    parts.root.classList.toggle("selected", on);
    parts.root.setAttribute("aria-pressed", on ? "true" : "false");
  }

  function select(id, on) {
    if (on) selected.add(id);
    else selected.delete(id);
    mark(id, on);
  }

  function clearSelection() {
    for (const id of [...selected]) select(id, false);
    showSelection();
  }

  function roomPcs() {
    return [...pcs.values()].filter(inRoom);
  }

  function showSelection() {
    const n = selected.size;
    selInfo.textContent = n ? t("sel.selected", { n }) : t("sel.whole_room", { n: roomPcs().length });
  }

  function target() {
    if (selected.size) {
      return { target: { pc_ids: [...selected] }, count: selected.size, label: t("sel.label_selected") };
    }
    return { target: { room_id: roomId }, count: roomPcs().length, label: room ? room.name : "" };
  }

  // Click a seat to toggle it; drag across seats (mouse or pen) to select a rectangle.
  let drag = null;
  const box = el("div", { class: "drag-box", hidden: true });
  gridWrap.append(box);

  gridWrap.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || ev.pointerType === "touch" || ev.target.closest("a")) return;
    drag = { x: ev.clientX, y: ev.clientY, moved: false, add: ev.shiftKey || ev.ctrlKey || ev.metaKey };
  });
  window.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    if (!drag.moved && Math.hypot(ev.clientX - drag.x, ev.clientY - drag.y) < 6) return;
    drag.moved = true;
    ev.preventDefault();
    const wrap = gridWrap.getBoundingClientRect();
    const left = Math.min(drag.x, ev.clientX);
    const top = Math.min(drag.y, ev.clientY);
    box.hidden = false;
    box.style.left = left - wrap.left + gridWrap.scrollLeft + "px";
    box.style.top = top - wrap.top + gridWrap.scrollTop + "px";
    box.style.width = Math.abs(ev.clientX - drag.x) + "px";
    box.style.height = Math.abs(ev.clientY - drag.y) + "px";
    drag.rect = { left, top, right: Math.max(drag.x, ev.clientX), bottom: Math.max(drag.y, ev.clientY) };
  });
  window.addEventListener("pointerup", () => {
    if (!drag) return;
    const done = drag;
    drag = null;
    box.hidden = true;
    if (!done.moved || !done.rect) return;
    if (!done.add) clearSelection();
    for (const [id, parts] of seats) {
      if (!parts.root.closest("#grid")) continue;
      const r = parts.root.getBoundingClientRect();
      const hit = r.left < done.rect.right && r.right > done.rect.left && r.top < done.rect.bottom && r.bottom > done.rect.top;
      if (hit) select(id, true);
    }
    suppressClick = true;
    setTimeout(() => (suppressClick = false), 0);
    showSelection();
  });
  let suppressClick = false;

  function toggleFrom(ev) {
    if (suppressClick || ev.target.closest("a")) return;
    const seat = ev.target.closest(".seat[data-pc]");
    if (!seat) return;
    const id = Number(seat.dataset.pc);
    select(id, !selected.has(id));
    showSelection();
  }
  for (const container of [gridWrap, unseatedBox, unassignedBox]) {
    container.addEventListener("click", toggleFrom);
    container.addEventListener("keydown", (ev) => {
      if (ev.key === " " || ev.key === "Enter") {
        if (ev.target.closest("a")) return;
        ev.preventDefault();
        toggleFrom(ev);
      }
    });
  }

  document.getElementById("select-online").addEventListener("click", () => {
    clearSelection();
    for (const pc of roomPcs()) if (W.statusOf(pc.state, pc.reason) === "online") select(pc.id, true);
    showSelection();
  });
  document.getElementById("select-none").addEventListener("click", clearSelection);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !document.querySelector("dialog[open]")) clearSelection();
  });

  Actions.toolbar(document.getElementById("actions"), target);
  const stream = W.live({
    resync: () => load().then(showSelection),
    message: onMessage,
  });
})();
