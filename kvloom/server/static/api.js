// Calls to this server, with its API key when it has one.
// The key is asked for on a 401, kept only in this browser (sessionStorage, or localStorage when
// "remember" is ticked), and sent only to this server: every URL here is a same-origin path.

const KEY = "kvloom.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

function saveKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

let asking = null;   // one dialog for concurrent 401s

function askKey(message) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dlg = document.createElement("dialog");
    dlg.className = "key";
    dlg.innerHTML = `
      <form method="dialog">
        <h3>API key</h3>
        <p class="why"></p>
        <input type="password" name="key" autocomplete="off" placeholder="sk-..." required>
        <label><input type="checkbox" name="remember"> remember on this device</label>
        <div class="buttons">
          <button type="button" value="cancel" class="cancel">Cancel</button>
          <button type="submit" class="primary">Use key</button>
        </div>
      </form>`;
    dlg.querySelector(".why").textContent = message;
    document.body.appendChild(dlg);
    const form = dlg.querySelector("form");
    const done = (key) => { dlg.close(); dlg.remove(); asking = null; resolve(key); };
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const key = form.key.value.trim();
      if (!key) return;
      saveKey(key, form.remember.checked);
      done(key);
    });
    dlg.querySelector(".cancel").addEventListener("click", () => done(null));
    dlg.addEventListener("cancel", () => done(null));
    dlg.showModal();
    form.key.focus();
  });
  return asking;
}

export class Unauthorized extends Error {}

// fetch(path) with Authorization; on 401 asks for the key and retries (until cancelled).
export async function apiFetch(path, options = {}) {
  if (!path.startsWith("/") || path.startsWith("//")) throw new Error("apiFetch only calls this server");
  let first = true;
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = getKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const resp = await fetch(path, { ...options, headers, credentials: "same-origin" });
    if (resp.status !== 401) return resp;
    const msg = first && !key ? "This server needs an API key." : "The server did not accept that key.";
    first = false;
    forgetKey();
    if (!(await askKey(msg))) throw new Unauthorized("no API key");
  }
}

// The message of an OpenAI-style error body, or the status line.
export async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

export function fmt(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}
