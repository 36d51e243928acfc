// Moving between views without reloading: views call navigate(); app.js renders the new URL.

export function navigate(href, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', href);
  else history.pushState(null, '', href);
  window.dispatchEvent(new Event('cairn:navigate'));
}
