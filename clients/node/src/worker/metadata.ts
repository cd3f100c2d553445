/**
 * An attempt's metadata: the object as the task sees it, and the operations made since the last
 * flush (sent as one MetadataUpdate). Pure.
 */
export type MetadataOp = [type: "set" | "delete" | "append" | "remove" | "increment" | "replace", key: string, value: string];

export class MetadataBuffer {
  private current: Record<string, unknown>;
  private ops: MetadataOp[] = [];

  constructor(initial: Record<string, unknown> = {}) {
    this.current = structuredClone(initial);
  }

  get(key: string): unknown {
    return this.current[key];
  }

  /** A copy of the whole object. */
  snapshot(): Record<string, unknown> {
    return structuredClone(this.current);
  }

  set(key: string, value: unknown): void {
    this.current[key] = structuredClone(value);
    this.ops.push(["set", key, JSON.stringify(value ?? null)]);
  }

  delete(key: string): void {
    delete this.current[key];
    this.ops.push(["delete", key, ""]);
  }

  /** Append to the list at `key` (made when missing). */
  append(key: string, value: unknown): void {
    const list = this.current[key];
    this.current[key] = [...(Array.isArray(list) ? list : list === undefined ? [] : [list]), structuredClone(value)];
    this.ops.push(["append", key, JSON.stringify(value ?? null)]);
  }

  /** Remove every element equal to `value` from the list at `key`. */
  remove(key: string, value: unknown): void {
    const list = this.current[key];
    if (Array.isArray(list)) {
      const text = JSON.stringify(value);
      this.current[key] = list.filter((item) => JSON.stringify(item) !== text);
    }
    this.ops.push(["remove", key, JSON.stringify(value ?? null)]);
  }

  increment(key: string, by = 1): void {
    const value = this.current[key];
    this.current[key] = (typeof value === "number" ? value : 0) + by;
    this.ops.push(["increment", key, JSON.stringify(by)]);
  }

  decrement(key: string, by = 1): void {
    this.increment(key, -by);
  }

  /** Replace the whole object. */
  replace(value: Record<string, unknown>): void {
    this.current = structuredClone(value);
    this.ops.push(["replace", "", JSON.stringify(value)]);
  }

  /** The operations since the last call, in order. */
  take(): MetadataOp[] {
    const ops = this.ops;
    this.ops = [];
    return ops;
  }
}
