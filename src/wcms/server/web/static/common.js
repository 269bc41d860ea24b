// WCMS dashboard: helpers every page uses. Plain JS, no build step, no third-party code.
// Data from PCs (hostnames, users, process names) and rooms only ever reaches the page through
// textContent or attribute setters, never as HTML.
"use strict";

const W = (() => {
  const boot = JSON.parse(document.getElementById("wcms-boot").textContent);
  const catalog = boot.i18n;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  let clockOffset = 0; // server time minus browser time, in ms

  function t(key, vars) {
    let text = Object.prototype.hasOwnProperty.call(catalog, key) ? catalog[key] : key;
    if (vars) {
      for (const [name, value] of Object.entries(vars)) {
        text = text.split("{" + name + "}").join(String(value));
      }
    }
    return text;
  }

  class HttpError extends Error {
    constructor(status, body) {
      const msg = body && body.error ? body.error.message : t("error.http", { status });
      super(msg);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET" && method !== "HEAD") opts.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const resp = await fetch(path, opts);
    let data = null;
    try {
      data = await resp.json();
    } catch (_err) {
      data = null;
    }
    if (resp.status === 401) {
      location.assign("/login?next=" + encodeURIComponent(location.pathname));
    }
    if (!resp.ok) throw new HttpError(resp.status, data);
    return data;
  }

  // el("div", {class: "x", text: "y", data: {pc: 1}, on: {click: fn}}, child, ...)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
      else if (key === "on") for (const [k, v] of Object.entries(value)) node.addEventListener(k, v);
      else if (value === true) node.setAttribute(key, "");
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // ------------------------------------------------------------ statuses and times

  const STATUSES = boot.statuses; // ["online", "off", ...]
  const ICONS = { online: "●", off: "○", restarting: "↻", asleep: "☾", lost: "⚠", stopped: "■" };

  function statusOf(state, reason) {
    if (state === "online") return "online";
    return boot.offline_status[reason] || "off";
  }

  function statusBadge(status, sinceIso) {
    const badge = el(
      "span",
      { class: "badge st-" + status, title: t("status." + status + ".help") },
      el("span", { class: "ico", "aria-hidden": "true", text: ICONS[status] || "?" }),
      el("span", { class: "label", text: t("status." + status) }),
    );
    if (sinceIso) badge.append(el("span", { class: "since", data: { since: sinceIso }, text: ago(sinceIso) }));
    return badge;
  }

  function now() {
    return Date.now() + clockOffset;
  }

  function ago(iso) {
    if (!iso) return "";
    const secs = Math.max(0, Math.round((now() - Date.parse(iso)) / 1000));
    if (secs < 60) return t("time.s", { n: secs });
    if (secs < 3600) return t("time.min", { n: Math.floor(secs / 60) });
    if (secs < 86400) return t("time.h", { n: Math.floor(secs / 3600) });
    return t("time.d", { n: Math.floor(secs / 86400) });
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(Date.parse(iso));
    return d.toLocaleString(document.documentElement.lang === "ko" ? "ko-KR" : "en-GB");
  }

  // Refresh every "3 min" on the page now and then; one timer for the whole page.
  function tickTimes() {
    for (const node of document.querySelectorAll("[data-since]")) {
      const text = ago(node.dataset.since);
      if (node.textContent !== text) node.textContent = text;
    }
  }
  setInterval(tickTimes, 5000);

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function pct(n) {
    return n === null || n === undefined ? "—" : Math.round(n) + "%";
  }

  function loadClass(n) {
    if (n === null || n === undefined) return "";
    if (n > 90) return "hot";
    if (n > 75) return "warm";
    return "ok";
  }

  // ------------------------------------------------------------ notices

  function notice(message, kind) {
    let box = document.getElementById("notices");
    if (!box) {
      box = el("div", { id: "notices", role: "status", "aria-live": "polite" });
      document.body.append(box);
    }
    const item = el("div", { class: "notice " + (kind || "info"), text: message });
    box.append(item);
    setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
  }

  function errorText(err) {
    return err instanceof HttpError ? err.message : t("error.network");
  }

  // ------------------------------------------------------------ the live stream

  // handlers.resync(): fetch a fresh snapshot (returns a promise); handlers.message(m).
  // Messages that arrive while a snapshot loads are applied after it, in order.
  function live(handlers) {
    const dot = document.getElementById("live-indicator");
    let source = null;
    let syncing = false;
    let pending = [];

    function show(ok) {
      if (!dot) return;
      dot.className = ok ? "live on" : "live off";
      dot.textContent = ok ? t("live.on") : t("live.off");
    }

    function resync() {
      syncing = true;
      pending = [];
      return Promise.resolve(handlers.resync())
        .catch((err) => notice(errorText(err), "error"))
        .finally(() => {
          syncing = false;
          const queued = pending;
          pending = [];
          queued.forEach(handlers.message);
        });
    }

    function onMessage(ev) {
      const msg = JSON.parse(ev.data);
      if (msg.type === "hello") {
        clockOffset = Date.parse(msg.at) - Date.now();
        show(true);
        resync();
      } else if (msg.type === "resync") {
        resync();
      } else if (msg.type === "logged_out") {
        source.close();
        location.assign("/login");
      } else if (syncing) {
        pending.push(msg);
      } else {
        handlers.message(msg);
      }
    }

    function connect() {
      source = new EventSource("/api/events");
      source.addEventListener("message", onMessage);
      source.addEventListener("error", () => {
        show(false);
        if (source.readyState === EventSource.CLOSED) {
          // The browser gave up (e.g. a 401): check the session, then try again.
          api("GET", "/api/me").then(() => setTimeout(connect, 2000), () => undefined);
        }
      });
    }
    show(false);
    connect();
    return { resync };
  }

  // ------------------------------------------------------------ small widgets

  function confirmDialog(title, message, okLabel) {
    return new Promise((resolve) => {
      const dialog = el(
        "dialog",
        { class: "confirm" },
        el(
          "form",
          { method: "dialog" },
          el("h2", { text: title }),
          el("p", { text: message }),
          el(
            "div",
            { class: "buttons" },
            el("button", { value: "cancel", class: "secondary", text: t("action.cancel") }),
            el("button", { value: "ok", class: "danger", text: okLabel || t("action.confirm") }),
          ),
        ),
      );
      dialog.addEventListener("close", () => {
        resolve(dialog.returnValue === "ok");
        dialog.remove();
      });
      document.body.append(dialog);
      dialog.showModal();
    });
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain http on a lab network is not a secure context: fall back to a selected field.
    const field = el("textarea", { class: "offscreen", readonly: true });
    field.value = text;
    document.body.append(field);
    field.select();
    const ok = document.execCommand("copy");
    field.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy"));
  }

  function formData(form) {
    const out = {};
    for (const field of form.elements) {
      if (!field.name || field.name === "csrf_token") continue;
      if (field.type === "checkbox") out[field.name] = field.checked;
      else if (field.type === "number") out[field.name] = field.value === "" ? null : Number(field.value);
      else out[field.name] = field.value;
    }
    return out;
  }

  return {
    boot,
    t,
    api,
    el,
    append,
    clear,
    svg,
    STATUSES,
    ICONS,
    statusOf,
    statusBadge,
    ago,
    when,
    bytes,
    pct,
    loadClass,
    notice,
    errorText,
    live,
    confirmDialog,
    copyText,
    formData,
    HttpError,
  };
})();
