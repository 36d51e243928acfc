// How numbers, times and durations read on the page.

export function percent(p) {
  if (typeof p !== 'number' || !Number.isFinite(p)) return '–';
  const v = Math.max(0, Math.min(1, p)) * 100;
  return (v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(1)) + ' %';
}

/** "3 s", "4 min", "2 h 5 min", "3 d". */
export function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.floor(s / 3600);
  if (h < 48) {
    const rest = Math.round((s - h * 3600) / 60);
    return rest ? `${h} h ${rest} min` : `${h} h`;
  }
  return `${Math.round(s / 86400)} d`;
}

/** "in 3 min" / "3 min ago" relative to now. */
export function relative(ms, now = Date.now()) {
  const d = ms - now;
  if (Math.abs(d) < 1000) return 'now';
  return d > 0 ? `in ${duration(d)}` : `${duration(-d)} ago`;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
});

/** A clock time for today, a date and time otherwise. */
export function clock(ms) {
  if (typeof ms !== 'number') return '–';
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dateTimeFmt.format(d);
}

export function isoTime(ms) {
  return typeof ms === 'number' ? new Date(ms).toISOString() : '';
}

export function count(n) {
  return typeof n === 'number' ? n.toLocaleString('en-US').replace(/,/g, '\u202f') : '–';
}

/** Pretty JSON for display. */
export function json(value) {
  return JSON.stringify(value, null, 2);
}
