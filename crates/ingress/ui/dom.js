// Small DOM helpers: element creation without innerHTML (no injection from server data) and
// writes that skip unchanged values, so live updates touch the page only where something moved.

/** h('a.cls', {href}, child, …): an element with classes, attributes/properties and children. */
export function h(tag, attrs, ...children) {
  const [name, ...classes] = tag.split('.');
  const el = document.createElement(name || 'div');
  if (classes.length) el.className = classes.join(' ');
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k in el && typeof v !== 'string') el[k] = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** Sets an element's text only when it differs (no layout work for unchanged values). */
export function setText(el, text) {
  const s = text ?? '';
  if (el.textContent !== s) el.textContent = s;
}

/** Shows or hides an element, touching it only on change. */
export function setShown(el, shown) {
  if (el.hidden === shown) el.hidden = !shown;
}

/** Sets a data attribute only on change. */
export function setData(el, name, value) {
  const s = value ?? '';
  if (el.dataset[name] !== s) el.dataset[name] = s;
}

export function clear(el) {
  el.replaceChildren();
}
