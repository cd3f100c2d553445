/** Durations as the Python SDK takes them: seconds (a number), or text like "90s", "10m",
 * "1h30m", "1d", "500ms". */
import { ConfigurationError } from "./errors.js";

export type DurationLike = number | string;

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/** Milliseconds of a duration; throws ConfigurationError naming `field` when it is not one. */
export function toMs(value: DurationLike, field = "duration"): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value) || value < 0) {
      throw new ConfigurationError(`${field}: ${value} is not a duration (seconds, at least 0)`);
    }
    return Math.round(value * 1000);
  }
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return toMs(Number(text), field);
  const part = /(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/gy;
  let total = 0;
  let end = 0;
  for (let match = part.exec(text); match !== null; match = part.exec(text)) {
    total += Number(match[1]) * (UNITS[match[2] as string] as number);
    end = part.lastIndex;
  }
  if (text === "" || end !== text.length) {
    throw new ConfigurationError(`${field}: "${value}" is not a duration (like "90s", "10m", "1h30m")`);
  }
  return Math.round(total);
}
