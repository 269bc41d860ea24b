// All rooms at a glance: one tile per room with its counts per status, live.
"use strict";

(() => {
  const { t, el, api, clear } = W;
  const tiles = document.getElementById("tiles");
  let rooms = [];
  const pcs = new Map(); // id -> {room_id, state, reason}

  function countsFor(roomId) {
    const counts = Object.fromEntries(W.STATUSES.map((s) => [s, 0]));
    for (const pc of pcs.values()) if (pc.room_id === roomId) counts[W.statusOf(pc.state, pc.reason)] += 1;
    return counts;
  }

  function tile(name, href, counts, extraClass) {
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const trouble = counts.lost + counts.stopped;
    const list = el("ul", { class: "tile-counts" });
    for (const s of W.STATUSES) {
      if (!counts[s] && s !== "online") continue;
      list.append(
        el(
          "li",
          { class: "count st-" + s, data: { status: s } },
          el("span", { class: "ico", "aria-hidden": "true", text: W.ICONS[s] }),
          el("b", { text: String(counts[s]) }),
          " ",
          t("status." + s),
        ),
      );
    }
    return el(
      "a",
      { class: "tile" + (trouble ? " trouble" : "") + (extraClass ? " " + extraClass : ""), href },
      el("h2", { text: name }),
      el("p", { class: "muted", text: t("overview.pcs", { n: total }) }),
      list,
    );
  }

  function render() {
    const frag = document.createDocumentFragment();
    for (const room of rooms) frag.append(tile(room.name, "/rooms/" + room.id, countsFor(room.id)));
    const unassigned = countsFor(null);
    if (Object.values(unassigned).some(Boolean)) {
      frag.append(tile(t("overview.unassigned"), "/layout", unassigned, "unassigned"));
    }
    clear(tiles).append(frag);
    if (!rooms.length) {
      tiles.append(el("p", { class: "empty-hint" }, t("overview.no_rooms") + " ", el("a", { href: "/layout", text: t("nav.layout") })));
    }
    document.body.dataset.ready = "1";
  }

  async function load() {
    const [r, p] = await Promise.all([api("GET", "/api/rooms"), api("GET", "/api/pcs")]);
    rooms = r.rooms;
    pcs.clear();
    for (const pc of p.pcs) pcs.set(pc.id, { room_id: pc.room_id, state: pc.state, reason: pc.reason });
    render();
  }

  let pendingRender = null;
  function onMessage(msg) {
    if (msg.type === "presence") {
      const pc = pcs.get(msg.pc_id);
      if (!pc) {
        stream.resync();
        return;
      }
      pc.state = msg.state;
      pc.reason = msg.reason;
      if (!pendingRender) pendingRender = requestAnimationFrame(() => ((pendingRender = null), render()));
    } else if (msg.type === "layout" || msg.type === "pc_deleted") {
      stream.resync();
    }
  }

  const stream = W.live({ resync: load, message: onMessage });
})();
