namespace QcowTier.Tests.Tiering.Support;

/// <summary>
/// Drives a tiered image and a <see cref="DiskModel"/> with the same random guest operations
/// (unaligned writes, write-zeroes with and without unmap, discards, tier moves, flushes) and
/// keeps a log of the last operations for failure messages.
/// </summary>
internal sealed class RandomOps
{
    private readonly Random _rng;
    private readonly DiskModel _model;
    private readonly Queue<string> _log = new();
    private readonly int _maxLength;

    public RandomOps(Random rng, DiskModel model, int maxLength)
    {
        _rng = rng;
        _model = model;
        _maxLength = maxLength;
    }

    public int Moves { get; private set; }

    public string Recent => string.Join("\n", _log);

    private void Log(string s)
    {
        _log.Enqueue(s);
        while (_log.Count > 20)
        {
            _log.Dequeue();
        }
    }

    private (long Offset, int Length) Range()
    {
        var cs = _model.ClusterSize;
        long offset;
        int length;
        switch (_rng.Next(4))
        {
            case 0: // cluster-aligned whole clusters
                var clusters = (int)(_model.Size / cs);
                var c = _rng.Next(clusters);
                offset = (long)c * cs;
                length = (int)Math.Min((long)cs * _rng.Next(1, Math.Max(2, _maxLength / cs + 1)), _model.Size - offset);
                break;
            case 1: // inside one cluster
                offset = _rng.NextInt64(_model.Size);
                length = (int)Math.Min(_rng.Next(1, Math.Min(cs, 4096) + 1), _model.Size - offset);
                break;
            default: // anything, unaligned
                offset = _rng.NextInt64(_model.Size);
                length = (int)Math.Min(_rng.Next(1, _maxLength + 1), _model.Size - offset);
                break;
        }
        return (offset, Math.Max(length, 1));
    }

    /// <summary>One random operation, applied to both.</summary>
    public void Step(QcowImage image, bool allowMoves = true)
    {
        var roll = _rng.Next(100);
        var (offset, length) = Range();
        if (roll < 55)
        {
            var data = TierKit.RandomBytes(_rng, length);
            Log($"write {offset} +{length}");
            image.Write(offset, data);
            _model.Write(offset, data);
        }
        else if (roll < 65)
        {
            var unmap = _rng.Next(2) == 0;
            Log($"zero{(unmap ? "-unmap" : "")} {offset} +{length}");
            image.WriteZeroes(offset, length, unmap);
            _model.Zero(offset, length);
        }
        else if (roll < 75)
        {
            Log($"discard {offset} +{length}");
            image.Discard(offset, length);
            _model.Discard(offset, length);
        }
        else if (roll < 85 && allowMoves)
        {
            var tier = _rng.Next(2) == 0 ? StorageTier.Ssd : StorageTier.Hdd;
            var len = Math.Min(_model.Size - offset, (long)length * _rng.Next(1, 8));
            Log($"move {offset} +{len} -> {tier}");
            image.MoveToTier(offset, len, tier);
            Moves++;
        }
        else if (roll < 90)
        {
            Log("flush");
            image.Flush();
        }
        else
        {
            // Read back a random range and check it right away: finds a bad mapping close to its cause.
            Log($"read {offset} +{length}");
            var buf = new byte[length];
            image.Read(offset, buf);
            TierKit.AssertSame(buf, _model.Data.AsSpan((int)offset, length), offset, "\nrecent operations:\n" + Recent);
        }
    }

    public async Task StepAsync(QcowImage image)
    {
        var roll = _rng.Next(100);
        var (offset, length) = Range();
        if (roll < 55)
        {
            var data = TierKit.RandomBytes(_rng, length);
            Log($"write-async {offset} +{length}");
            await image.WriteAsync(offset, data);
            _model.Write(offset, data);
        }
        else if (roll < 65)
        {
            var unmap = _rng.Next(2) == 0;
            Log($"zero-async{(unmap ? "-unmap" : "")} {offset} +{length}");
            await image.WriteZeroesAsync(offset, length, unmap);
            _model.Zero(offset, length);
        }
        else if (roll < 75)
        {
            Log($"discard-async {offset} +{length}");
            await image.DiscardAsync(offset, length);
            _model.Discard(offset, length);
        }
        else if (roll < 85)
        {
            var tier = _rng.Next(2) == 0 ? StorageTier.Ssd : StorageTier.Hdd;
            Log($"move {offset} +{length} -> {tier}");
            await Task.Run(() => image.MoveToTier(offset, length, tier));
            Moves++;
        }
        else if (roll < 90)
        {
            Log("flush-async");
            await image.FlushAsync();
        }
        else
        {
            Log($"read-async {offset} +{length}");
            var buf = new byte[length];
            await image.ReadAsync(offset, buf);
            TierKit.AssertSame(buf, _model.Data.AsSpan((int)offset, length), offset, "\nrecent operations:\n" + Recent);
        }
    }
}
