// The layout editor: rooms (create, rename, resize, retire, restore) and seats. Drag a PC onto a
// seat, onto another room in the list, or onto the unassigned pool. Without a mouse (a tablet):
// tap a PC to pick it up, then tap where it goes.
"use strict";

(() => {
  const { t, el, api, clear } = W;
  const $ = (id) => document.getElementById(id);
  let rooms = [];
  let roomId = Number(new URLSearchParams(location.search).get("room")) || null;
  let pcs = []; // PCs of the selected room
  let unassigned = [];
  let picked = null; // pc id picked up by a tap

  // ------------------------------------------------------------ data

  async function load() {
    const [r, u] = await Promise.all([api("GET", "/api/rooms?retired=1"), api("GET", "/api/pcs/unassigned")]);
    rooms = r.rooms;
    unassigned = u.pcs;
    const active = rooms.filter((x) => x.active);
    if (!rooms.some((x) => x.id === roomId)) roomId = active.length ? active[0].id : null;
    pcs = roomId ? (await api("GET", "/api/rooms/" + roomId)).pcs : [];
    render();
  }

  function room() {
    return rooms.find((x) => x.id === roomId) || null;
  }

  async function act(promise, okText) {
    try {
      const result = await promise;
      if (okText) W.notice(okText, "ok");
      picked = null;
      await load();
      return result;
    } catch (err) {
      W.notice(W.errorText(err), "error");
      return null;
    }
  }

  function place(pcId, body) {
    return act(api("PUT", "/api/pcs/" + pcId + "/seat", body));
  }

  function unassign(pcId) {
    return act(api("DELETE", "/api/pcs/" + pcId + "/seat"));
  }

  // ------------------------------------------------------------ rendering

  function chip(pc) {
    const status = W.statusOf(pc.state, pc.reason);
    const node = el(
      "div",
      {
        class: "chip st-" + status + (picked === pc.id ? " picked" : ""),
        draggable: "true",
        tabindex: "0",
        data: { pc: pc.id },
        title: pc.hostname + " — " + t("status." + status),
      },
      el("span", { class: "ico", "aria-hidden": "true", text: W.ICONS[status] }),
      el("span", { class: "host", text: pc.hostname }),
    );
    node.addEventListener("dragstart", (ev) => {
      ev.dataTransfer.setData("text/x-wcms-pc", String(pc.id));
      ev.dataTransfer.effectAllowed = "move";
    });
    node.addEventListener("click", (ev) => {
      ev.stopPropagation();
      picked = picked === pc.id ? null : pc.id;
      render();
    });
    return node;
  }

  // Make `node` accept a dropped (or picked-and-tapped) PC and call `onPc(id)`.
  function target(node, onPc) {
    node.addEventListener("dragover", (ev) => {
      if (!ev.dataTransfer.types.includes("text/x-wcms-pc")) return;
      ev.preventDefault();
      node.classList.add("over");
    });
    node.addEventListener("dragleave", () => node.classList.remove("over"));
    node.addEventListener("drop", (ev) => {
      ev.preventDefault();
      node.classList.remove("over");
      const id = Number(ev.dataTransfer.getData("text/x-wcms-pc"));
      if (id) onPc(id);
    });
    node.addEventListener("click", () => {
      if (picked !== null) onPc(picked);
    });
  }

  function renderRooms() {
    const list = clear($("room-list"));
    for (const r of rooms) {
      const item = el(
        "li",
        { class: (r.id === roomId ? "current " : "") + (r.active ? "" : "retired"), data: { room: r.id } },
        el("button", { type: "button", class: "link", text: r.name, on: { click: () => ((roomId = r.id), load()) } }),
        el("span", { class: "muted", text: r.active ? t("layout.size", { rows: r.rows, cols: r.cols, n: r.pc_count }) : t("layout.retired") }),
      );
      if (r.active && r.id !== roomId) target(item, (pcId) => place(pcId, { room_id: r.id }));
      list.append(item);
    }
    if (!rooms.length) list.append(el("li", { class: "muted", text: t("overview.no_rooms") }));
  }

  function renderEditor() {
    const r = room();
    const editor = $("room-editor");
    editor.hidden = !r;
    if (!r) return;
    $("edit-name").value = r.name;
    $("edit-rows").value = r.rows;
    $("edit-cols").value = r.cols;
    $("retire").hidden = !r.active;
    $("restore").hidden = r.active;
    const grid = clear($("layout-grid"));
    grid.style.gridTemplateColumns = "repeat(" + r.cols + ", minmax(7.5rem, 1fr))";
    const bySeat = new Map(pcs.filter((p) => p.seat).map((p) => [p.seat.row + ":" + p.seat.col, p]));
    const frag = document.createDocumentFragment();
    for (let row = 1; row <= r.rows; row += 1) {
      for (let col = 1; col <= r.cols; col += 1) {
        const pc = bySeat.get(row + ":" + col);
        const cell = el("div", { class: "slot" + (pc ? " taken" : ""), data: { row, col } }, el("span", { class: "place", text: row + "-" + col }));
        if (pc) cell.append(chip(pc));
        if (r.active) {
          target(cell, (pcId) => {
            if (pc && pc.id === pcId) return;
            place(pcId, { room_id: r.id, row, col, swap: true });
          });
        }
        frag.append(cell);
      }
    }
    grid.append(frag);
    const unseated = clear($("unseated-pool"));
    for (const pc of pcs.filter((p) => !p.seat)) unseated.append(chip(pc));
  }

  function renderPool() {
    const pool = clear($("pool"));
    for (const pc of unassigned) pool.append(chip(pc));
    if (!unassigned.length) pool.append(el("p", { class: "muted", text: t("room.no_unassigned") }));
  }

  function render() {
    renderRooms();
    renderEditor();
    renderPool();
    $("picked-hint").hidden = picked === null;
    document.body.dataset.ready = "1";
  }

  // ------------------------------------------------------------ forms

  target($("pool-zone"), (pcId) => unassign(pcId));
  target($("unseated-zone"), (pcId) => roomId && place(pcId, { room_id: roomId }));

  $("new-room").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = W.formData(ev.target);
    const made = await act(api("POST", "/api/rooms", body), t("layout.created", { name: body.name }));
    if (made) {
      roomId = made.id;
      ev.target.reset();
      await load();
    }
  });
  $("rename-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(api("PATCH", "/api/rooms/" + roomId, { name: $("edit-name").value }), t("layout.saved"));
  });
  $("resize-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = { rows: Number($("edit-rows").value), cols: Number($("edit-cols").value) };
    act(api("PATCH", "/api/rooms/" + roomId, body), t("layout.saved"));
  });
  $("retire").addEventListener("click", async () => {
    const r = room();
    const ok = await W.confirmDialog(t("layout.retire_title", { name: r.name }), t("layout.retire_text", { n: r.pc_count }), t("layout.retire"));
    if (ok) act(api("PATCH", "/api/rooms/" + roomId, { active: false }), t("layout.saved"));
  });
  $("restore").addEventListener("click", () => act(api("PATCH", "/api/rooms/" + roomId, { active: true }), t("layout.saved")));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && picked !== null) {
      picked = null;
      render();
    }
  });

  W.live({
    resync: load,
    message: (msg) => {
      if (msg.type === "layout" || msg.type === "pc_deleted") load();
    },
  });
})();
