/** An async queue: what a bidirectional stream sends, pushed from anywhere. */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiter: ((done: boolean) => void) | null = null;
  private closed = false;

  push(item: T): void {
    if (this.closed) throw new Error("push on a closed queue");
    this.items.push(item);
    this.wake(false);
  }

  /** End the iteration; returns the items not taken. */
  close(): T[] {
    this.closed = true;
    this.wake(true);
    return this.items.splice(0);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private wake(done: boolean): void {
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.(done);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    while (true) {
      const item = this.items.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      if (this.closed) return;
      await new Promise<boolean>((resolve) => {
        this.waiter = resolve;
      });
    }
  }
}
