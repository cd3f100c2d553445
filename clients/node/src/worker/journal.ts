/**
 * The waits of one attempt, numbered in call order from 1 (the scheduler journals each under its
 * seq). A Resume resolves the waits it has results for; a result for a seq the attempt has not
 * asked for yet is kept, and that wait returns it at once when it comes. That is how a replay
 * runs through its journaled waits. Pure: no IO, no timers.
 */

/** A completed wait: `output` is JSON text; `error` when not ok. */
export interface WaitOutcome {
  ok: boolean;
  output: string;
  error: { type: string; message: string; stackTrace: string } | null;
}

export interface WaitResultIn extends WaitOutcome {
  seq: number;
}

interface Pending {
  resolve: (outcome: WaitOutcome) => void;
  reject: (error: unknown) => void;
}

export class Journal {
  private nextSeq = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly early = new Map<number, WaitOutcome>();
  private closedWith: unknown = undefined;
  private closed = false;

  /** Waits asked for and not answered yet. */
  get waiting(): number {
    return this.pending.size;
  }

  /**
   * The next wait: its seq, and either its result already (`known`), or a promise of it that
   * the caller awaits after sending the request.
   */
  next(): { seq: number; known: WaitOutcome | undefined; outcome: Promise<WaitOutcome> } {
    if (this.closed) throw this.closedWith;
    const seq = this.nextSeq++;
    const known = this.early.get(seq);
    if (known !== undefined) {
      this.early.delete(seq);
      return { seq, known, outcome: Promise.resolve(known) };
    }
    const outcome = new Promise<WaitOutcome>((resolve, reject) => {
      this.pending.set(seq, { resolve, reject });
    });
    return { seq, known: undefined, outcome };
  }

  /** The results of a Resume; results of seqs already answered are ignored. */
  resume(results: WaitResultIn[]): number[] {
    const resolved: number[] = [];
    for (const { seq, ...outcome } of results) {
      const waiting = this.pending.get(seq);
      if (waiting !== undefined) {
        this.pending.delete(seq);
        waiting.resolve(outcome);
        resolved.push(seq);
      } else if (seq >= this.nextSeq) {
        this.early.set(seq, outcome);
      }
    }
    return resolved;
  }

  /** Fail every pending wait and every later one with `error` (the attempt was cancelled). */
  close(error: unknown): void {
    this.closed = true;
    this.closedWith = error;
    for (const waiting of this.pending.values()) waiting.reject(error);
    this.pending.clear();
  }
}
