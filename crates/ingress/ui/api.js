// Calls to ingress's REST API, on this origin only. With auth on, a 401 asks for a bearer token
// once; the token is kept in sessionStorage, so it lasts as long as the tab.

const TOKEN_KEY = 'cairn.token';

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Asks for a token (a modal dialog); resolves once one is stored, or with null if dismissed. */
let asking = null;
export function askToken(reason) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = document.createElement('dialog');
    dialog.className = 'token';
    const form = document.createElement('form');
    form.method = 'dialog';
    const label = document.createElement('label');
    label.textContent = reason || 'This Cairn needs a token. Paste a bearer token (kept for this tab only):';
    const input = document.createElement('input');
    input.type = 'password';
    input.name = 'token';
    input.autocomplete = 'off';
    input.required = true;
    label.append(input);
    const ok = document.createElement('button');
    ok.textContent = 'Use token';
    form.append(label, ok);
    dialog.append(form);
    document.body.append(dialog);
    dialog.addEventListener('close', () => {
      const value = input.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      dialog.remove();
      asking = null;
      resolve(value || null);
    });
    dialog.showModal();
  });
  return asking;
}

/** fetch() of a same-origin JSON API; throws ApiError with the server's message. */
export async function api(path, { method = 'GET', body, headers = {}, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const h = { accept: 'application/json', ...headers };
    const t = token();
    if (t) h.authorization = `Bearer ${t}`;
    if (body !== undefined) h['content-type'] = 'application/json';
    const response = await fetch(path, {
      method, headers: h, signal, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && attempt === 0) {
      const reason = t ? 'The token was refused. Paste another bearer token:' : undefined;
      if (t) sessionStorage.removeItem(TOKEN_KEY);
      if (await askToken(reason)) continue;
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!response.ok) {
      const message = (data && (data.error || data.message)) || `${method} ${path}: HTTP ${response.status}`;
      throw new ApiError(response.status, message, data);
    }
    return data;
  }
}

/** `/status/{key}/events` (or any SSE path) with the token as `access_token` when there is one. */
export function eventsUrl(path, params) {
  const q = new URLSearchParams(params);
  const t = token();
  if (t) q.set('access_token', t);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

export function statusPath(key) {
  return `/status/${encodeURIComponent(key)}`;
}
