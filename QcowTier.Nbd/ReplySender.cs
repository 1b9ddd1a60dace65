using System.Buffers;
using System.Collections.Concurrent;
using System.Net.Sockets;

namespace QcowTier.Nbd;

/// <summary>
/// The one writer of a connection's socket. Whoever posts a reply while nobody is sending becomes the
/// sender and drains the queue (a combining lock: no sender thread, no wake-ups, no thread hops); others
/// only enqueue. Small replies are coalesced into one send, large ones go straight from their buffer, so
/// replies never interleave and a burst of replies costs one system call. While the reader is
/// <see cref="Cork"/>ed (working through requests already received), replies wait for
/// <see cref="Uncork"/>, which sends them together.
/// </summary>
internal sealed class ReplySender
{
    private const int CoalesceLimit = 16 << 10;
    private const int BatchSize = 256 << 10;

    private readonly Socket _socket;
    private readonly ConcurrentQueue<Reply> _queue = new();
    private readonly byte[] _batch = Buffers.Pool.Rent(BatchSize);
    private int _sending;
    private volatile bool _corked;
    private volatile bool _broken;
    private Task _drain = Task.CompletedTask;

    public ReplySender(Socket socket) => _socket = socket;

    /// <summary>Whether sending failed (the client went away); later replies are dropped.</summary>
    public bool Broken => _broken;

    /// <summary>Queues bytes [offset, offset+count) of a pooled buffer, which the sender returns to the pool.</summary>
    public void Post(byte[] buffer, int offset, int count)
    {
        _queue.Enqueue(new Reply(buffer, offset, count));
        if (!_corked)
        {
            TrySend();
        }
    }

    /// <summary>Holds replies back until <see cref="Uncork"/> (only the reader corks).</summary>
    public void Cork() => _corked = true;

    /// <summary>Sends what was held back.</summary>
    public void Uncork()
    {
        _corked = false;
        TrySend();
    }

    /// <summary>Sends everything queued (the caller guarantees nothing more is posted), then releases the buffers.</summary>
    public async Task CompleteAsync()
    {
        _corked = false;
        while (true)
        {
            TrySend();
            await _drain.ConfigureAwait(false);
            if (_queue.IsEmpty && Volatile.Read(ref _sending) == 0)
            {
                break;
            }
            await Task.Delay(1).ConfigureAwait(false);
        }
        Buffers.Pool.Return(_batch);
    }

    private void TrySend()
    {
        if (!_queue.IsEmpty && Interlocked.CompareExchange(ref _sending, 1, 0) == 0)
        {
            _drain = DrainAsync();
        }
    }

    /// <summary>Runs with <see cref="_sending"/> held; completes synchronously (and allocation-free) unless the socket is full.</summary>
    private async Task DrainAsync()
    {
        while (true)
        {
            var used = 0;
            while (_queue.TryDequeue(out var r))
            {
                if (_broken)
                {
                    Buffers.Pool.Return(r.Buffer);
                    continue;
                }
                if (r.Count <= CoalesceLimit)
                {
                    if (used + r.Count > _batch.Length)
                    {
                        await SendAsync(_batch.AsMemory(0, used)).ConfigureAwait(false);
                        used = 0;
                    }
                    r.Buffer.AsSpan(r.Offset, r.Count).CopyTo(_batch.AsSpan(used));
                    used += r.Count;
                    Buffers.Pool.Return(r.Buffer);
                    continue;
                }
                if (used > 0)
                {
                    await SendAsync(_batch.AsMemory(0, used)).ConfigureAwait(false);
                    used = 0;
                }
                try
                {
                    await SendAsync(r.Buffer.AsMemory(r.Offset, r.Count)).ConfigureAwait(false);
                }
                finally
                {
                    Buffers.Pool.Return(r.Buffer);
                }
            }
            if (used > 0)
            {
                await SendAsync(_batch.AsMemory(0, used)).ConfigureAwait(false);
            }
            Interlocked.Exchange(ref _sending, 0); // a full fence: the checks below must not move above it
            // A reply posted after the queue looked empty but before the flag dropped would be stranded.
            if (_queue.IsEmpty || _corked || Interlocked.CompareExchange(ref _sending, 1, 0) != 0)
            {
                return;
            }
        }
    }

    private async ValueTask SendAsync(ReadOnlyMemory<byte> data)
    {
        if (_broken)
        {
            return;
        }
        try
        {
            while (!data.IsEmpty)
            {
                var n = await _socket.SendAsync(data, SocketFlags.None).ConfigureAwait(false);
                data = data[n..];
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or IOException)
        {
            // The client is gone: the reader notices too; replies still queued are dropped.
            _broken = true;
        }
    }

    private readonly record struct Reply(byte[] Buffer, int Offset, int Count);
}
