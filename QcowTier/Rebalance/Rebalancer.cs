using System.Diagnostics;

namespace QcowTier;

/// <summary>An image to rebalance and the heat map that describes it.</summary>
/// <param name="Image">A tiered image, open read-write for an apply.</param>
/// <param name="Heat">Its heat map (bound to the image's <see cref="QcowImage.HeatIdentity"/>).</param>
public sealed record RebalanceInput(QcowImage Image, HeatMap Heat);

/// <summary>
/// Plans and applies cluster moves between SSD and HDD from heat maps. The plan promotes a unit only
/// on clear evidence (hysteresis against the coldest resident it displaces), never moves pinned
/// ranges, respects the SSD budget and a cap on bytes moved, and says when tiering will not help.
/// </summary>
public static class Rebalancer
{
    private struct Unit
    {
        public long Index;     // unit index in the image's heat map
        public float Score;
        public float Reads;
        public float Writes;
        public float Sequential;
        public int SsdBytes;   // allocated bytes of the unit on each tier
        public int HddBytes;
        public int Image;
        public bool Pinned;
    }

    private const byte Stay = 0, ToSsd = 1, ToHdd = 2;

    /// <summary>Plans moves for one or more images.</summary>
    /// <param name="inputs">The images and their heat maps.</param>
    /// <param name="policy">Budget, hysteresis, caps and weights.</param>
    /// <returns>The plan.</returns>
    /// <remarks>
    /// Time and memory are linear in the allocated units: every ordering is a stable radix sort on the
    /// score's bits (ties keep disk order), and moves are marked in an array and read back in disk order.
    /// </remarks>
    public static RebalancePlan Plan(IReadOnlyList<RebalanceInput> inputs, RebalancePolicy policy)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(policy);
        if (inputs.Count == 0)
        {
            throw new ArgumentException("nothing to plan: no images", nameof(inputs));
        }
        var notes = new List<string>();
        var units = new List<Unit>();
        var ids = new List<Guid>();
        var budgets = new long[inputs.Count];
        for (var i = 0; i < inputs.Count; i++)
        {
            var (image, heat) = (inputs[i].Image, inputs[i].Heat);
            Validate(image, heat, i);
            ids.Add(image.HeatIdentity);
            budgets[i] = policy.SsdBudgetBytes
                ?? (policy.SsdBudgetPercent is { } pct ? (long)(image.Size * Math.Clamp(pct, 0, 100) / 100) : image.SsdBudget);
            if (budgets[i] <= 0 && policy.SsdBudgetBytes is null && policy.SsdBudgetPercent is null)
            {
                throw new ArgumentException($"{image.FileName ?? $"image {i}"} has no SSD budget: give one in the policy", nameof(policy));
            }
            CollectUnits(i, image, heat, policy, units);
        }
        var all = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(units);
        if (policy.SequentialRunBytes is { } runBytes)
        {
            DiscountSequentialRuns(all, inputs, runBytes, notes);
        }

        var pools = policy.SharedBudget
            ? [(Members: Enumerable.Range(0, inputs.Count).ToArray(), Budget: policy.SsdBudgetBytes ?? budgets.Sum())]
            : Enumerable.Range(0, inputs.Count).Select(i => (Members: new[] { i }, Budget: budgets[i])).ToArray();

        // The global heat order (hottest first, ties in disk order) gives every unit its rank and the skew.
        var hottestFirst = HottestFirst(all);
        var rank = new int[all.Length];
        for (var i = 0; i < hottestFirst.Length; i++)
        {
            rank[hottestFirst[i]] = i + 1;
        }
        var before = Predict(all, policy, null);
        var (skewed, top20) = Skew(all, hottestFirst, policy.MinimumSkew);
        if (!skewed)
        {
            notes.Add($"the hottest 20% of the allocated data serves {top20:P0} of the I/O (threshold {policy.MinimumSkew:P0}): the workload has no skew worth tiering for; only budget overruns are corrected");
        }

        var target = new byte[all.Length];
        long moveBytes = 0;
        var capHit = false;
        foreach (var (members, budget) in pools)
        {
            var inPool = new bool[inputs.Count];
            foreach (var m in members)
            {
                inPool[m] = true;
            }
            long used = 0;
            var residentCount = 0;
            var contenderCount = 0;
            foreach (ref readonly var unit in all)
            {
                if (inPool[unit.Image])
                {
                    used += unit.SsdBytes;
                    residentCount += !unit.Pinned && unit.SsdBytes > 0 ? 1 : 0;
                    contenderCount += !unit.Pinned && unit.HddBytes > 0 && unit.Score >= policy.MinimumPromotionScore ? 1 : 0;
                }
            }
            // Hottest contenders first (ties in disk order) and coldest residents first (ties in reverse
            // disk order), both read off the one global order.
            var residents = new int[residentCount];
            var contenders = new int[contenderCount];
            int ri = residentCount, ci = 0;
            foreach (var u in hottestFirst)
            {
                ref readonly var unit = ref all[u];
                if (!inPool[unit.Image] || unit.Pinned)
                {
                    continue;
                }
                if (unit.SsdBytes > 0)
                {
                    residents[--ri] = u;
                }
                if (unit.HddBytes > 0 && unit.Score >= policy.MinimumPromotionScore)
                {
                    contenders[ci++] = u;
                }
            }
            var r = 0;

            bool Fits(long bytes)
            {
                if (policy.MaxMoveBytes is { } cap && moveBytes + bytes > cap)
                {
                    capHit = true;
                    return false;
                }
                return true;
            }

            // Over budget: demote the coldest residents whatever their heat.
            while (used > budget && r < residents.Length)
            {
                var d = residents[r++];
                if (!Fits(all[d].SsdBytes))
                {
                    break;
                }
                target[d] = ToHdd;
                moveBytes += all[d].SsdBytes;
                used -= all[d].SsdBytes;
            }
            if (used > budget)
            {
                notes.Add($"the SSD tier holds {RebalancePlan.Size(used)} after demotions, over the {RebalancePlan.Size(budget)} budget (pinned data, or the move cap)");
            }
            if (!skewed)
            {
                continue;
            }
            foreach (var c in contenders)
            {
                var need = (long)all[c].HddBytes;
                if (used + need <= budget)
                {
                    if (!Fits(need))
                    {
                        break;
                    }
                    target[c] = ToSsd;
                    moveBytes += need;
                    used += need;
                    continue;
                }
                // Make room by displacing residents that are clearly colder than the contender.
                long freed = 0;
                var rr = r;
                while (used + need - freed > budget && rr < residents.Length)
                {
                    var d = residents[rr];
                    if (all[d].Score * policy.Hysteresis + policy.MinimumScoreGap >= all[c].Score)
                    {
                        break;
                    }
                    freed += all[d].SsdBytes;
                    rr++;
                }
                if (used + need - freed > budget || !Fits(need + freed))
                {
                    break; // every later contender is colder still
                }
                for (; r < rr; r++)
                {
                    target[residents[r]] = ToHdd;
                }
                target[c] = ToSsd;
                moveBytes += need + freed;
                used += need - freed;
            }
        }
        if (capHit)
        {
            notes.Add($"the move cap of {RebalancePlan.Size(policy.MaxMoveBytes!.Value)} stopped the plan early; run again to continue");
        }
        long pinnedBytes = 0;
        foreach (ref readonly var u in all)
        {
            pinnedBytes += u.Pinned ? (long)u.SsdBytes + u.HddBytes : 0;
        }
        if (pinnedBytes > 0)
        {
            notes.Add($"{RebalancePlan.Size(pinnedBytes)} of pinned data stays where its pins say");
        }

        var after = Predict(all, policy, target);
        var planned = Coalesce(inputs, all, target, rank, policy);
        var totalBytes = planned.Sum(m => m.Bytes);
        var seconds = planned.Sum(m => m.Cost.TotalSeconds);
        if (policy.ThrottleBytesPerSecond is { } t && t > 0)
        {
            seconds = Math.Max(seconds, totalBytes / t);
        }
        return new RebalancePlan(planned, before, after, policy.SharedBudget ? pools[0].Budget : budgets.Sum(), skewed, top20,
            TimeSpan.FromSeconds(seconds), notes, ids)
        {
            ThrottleBytesPerSecond = policy.ThrottleBytesPerSecond,
        };
    }

    /// <summary>
    /// Every unit, hottest first, stable (equal scores keep disk order): an LSD radix sort on the
    /// float's bits, which order like the values for the non-negative scores.
    /// </summary>
    private static int[] HottestFirst(ReadOnlySpan<Unit> units)
    {
        var items = new int[units.Length];
        var keys = new uint[units.Length];
        for (var i = 0; i < items.Length; i++)
        {
            items[i] = i;
            keys[i] = ~BitConverter.SingleToUInt32Bits(Math.Max(0f, units[i].Score) + 0f); // +0f: no negative zero
        }
        RadixSort(keys, items);
        return items;
    }

    /// <summary>Stable LSD radix sort of <paramref name="items"/> by <paramref name="keys"/>, 11 bits a pass, skipping passes where every key shares the digit.</summary>
    internal static void RadixSort(uint[] keys, int[] items)
    {
        const int Bits = 11, Buckets = 1 << Bits;
        var n = keys.Length;
        if (n < 2)
        {
            return;
        }
        var (origKeys, origItems) = (keys, items);
        var k2 = new uint[n];
        var i2 = new int[n];
        var count = new int[Buckets];
        for (var shift = 0; shift < 32; shift += Bits)
        {
            Array.Clear(count);
            foreach (var k in keys)
            {
                count[(int)((k >> shift) & (Buckets - 1))]++;
            }
            if (count[(int)((keys[0] >> shift) & (Buckets - 1))] == n)
            {
                continue; // every key has this digit: the pass would not move anything
            }
            var sum = 0;
            for (var b = 0; b < Buckets; b++)
            {
                var c = count[b];
                count[b] = sum;
                sum += c;
            }
            for (var i = 0; i < n; i++)
            {
                var pos = count[(int)((keys[i] >> shift) & (Buckets - 1))]++;
                k2[pos] = keys[i];
                i2[pos] = items[i];
            }
            (keys, k2) = (k2, keys);
            (items, i2) = (i2, items);
        }
        if (!ReferenceEquals(items, origItems))
        {
            keys.AsSpan().CopyTo(origKeys);
            items.AsSpan().CopyTo(origItems);
        }
    }

    private static void Validate(QcowImage image, HeatMap heat, int i)
    {
        if (!image.IsTiered)
        {
            throw new ArgumentException($"{image.FileName ?? $"image {i}"} is not a tiered image (attach a tier first)");
        }
        if (heat.ImageId != image.HeatIdentity)
        {
            throw new ArgumentException($"the heat map given for {image.FileName ?? $"image {i}"} belongs to image {heat.ImageId}, not {image.HeatIdentity}");
        }
        if (heat.UnitSize < image.ClusterSize || heat.VirtualSize > image.Size)
        {
            throw new ArgumentException($"the heat map for {image.FileName ?? $"image {i}"} has {heat.UnitSize}-byte units over {heat.VirtualSize} bytes; the image has {image.ClusterSize}-byte clusters over {image.Size} bytes");
        }
    }

    /// <summary>
    /// One entry per allocated unit, in disk order: placement runs come sorted, so the current unit is
    /// always the last one added, and pins are walked with a pointer, not searched per unit. Counters
    /// are read straight from the map's regions (one lookup per region, a table decode per unit).
    /// </summary>
    private static void CollectUnits(int image, QcowImage img, HeatMap heat, RebalancePolicy policy, List<Unit> units)
    {
        var unitBits = heat.UnitBits;
        var unitSize = heat.UnitSize;
        var pins = img.GetTierPins();
        var pin = 0;
        var last = -1L;
        var placement = img.GetPlacement();
        long allocated = 0;
        foreach (var ext in placement)
        {
            allocated += ext.Tier is null ? 0 : ext.Length;
        }
        units.EnsureCapacity((int)Math.Min(Array.MaxLength, units.Count + (allocated >> unitBits) + placement.Count + 1));
        var decode = DecodeTable;
        var (rw, ww) = ((float)policy.ReadWeight, (float)policy.WriteWeight);
        var pages = heat.Pages;
        var unitCount = heat.UnitCount;
        HeatMap.Page? page = null;
        var pageIndex = -1L;
        foreach (var ext in placement)
        {
            if (ext.Tier is not { } tier)
            {
                continue;
            }
            var ssd = tier == StorageTier.Ssd;
            var extEnd = ext.Start + ext.Length;
            for (var pos = ext.Start; pos < extEnd;)
            {
                var u = pos >> unitBits;
                var n = (int)(Math.Min((u + 1) << unitBits, extEnd) - pos);
                if (u != last)
                {
                    last = u;
                    var start = u << unitBits;
                    while (pin < pins.Count && pins[pin].Start + pins[pin].Length <= start)
                    {
                        pin++;
                    }
                    var unit = new Unit { Image = image, Index = u, Pinned = pin < pins.Count && pins[pin].Start < start + unitSize };
                    if (u >> HeatMap.PageBits != pageIndex)
                    {
                        pageIndex = u >> HeatMap.PageBits;
                        page = u < unitCount ? pages[pageIndex] : null;
                    }
                    if (page is not null && u < unitCount)
                    {
                        var i = (int)(u & (HeatMap.PageUnits - 1));
                        unit.Reads = decode[HeatMap.GetCode(page.Reads, i)];
                        unit.Writes = decode[HeatMap.GetCode(page.Writes, i)];
                        unit.Sequential = page.Sequential is { } q ? Math.Min(decode[HeatMap.GetCode(q, i)], unit.Reads + unit.Writes) : 0;
                        unit.Score = rw * unit.Reads + ww * unit.Writes;
                    }
                    units.Add(unit);
                }
                ref var current = ref System.Runtime.InteropServices.CollectionsMarshal.AsSpan(units)[^1];
                if (ssd)
                {
                    current.SsdBytes += n;
                }
                else
                {
                    current.HddBytes += n;
                }
                pos += n;
            }
        }
    }

    private static readonly float[] DecodeTable = Enumerable.Range(0, 256).Select(c => (float)Heat.HeatCounter.Decode((byte)c)).ToArray();

    /// <summary>
    /// Long runs of units whose I/O was mostly sequential keep only the score of their random share: an
    /// HDD streams them at its bandwidth, so SSD space buys them little (the device model's latency gap
    /// is what a promotion wins, and a scan pays it once per stream, not per unit).
    /// </summary>
    private static void DiscountSequentialRuns(Span<Unit> units, IReadOnlyList<RebalanceInput> inputs, long runBytes, List<string> notes)
    {
        static bool Streamed(in Unit u) => u.Reads + u.Writes > 0 && u.Sequential * 2 >= u.Reads + u.Writes;
        long discounted = 0, runs = 0;
        for (var i = 0; i < units.Length;)
        {
            if (!Streamed(units[i]))
            {
                i++;
                continue;
            }
            var j = i + 1;
            while (j < units.Length && units[j].Image == units[i].Image && units[j].Index == units[j - 1].Index + 1 && Streamed(units[j]))
            {
                j++;
            }
            var unitSize = inputs[units[i].Image].Heat.UnitSize;
            if ((j - i) * unitSize >= runBytes)
            {
                runs++;
                for (var k = i; k < j; k++)
                {
                    ref var u = ref units[k];
                    var total = u.Reads + u.Writes;
                    u.Score *= Math.Clamp(1 - u.Sequential / total, 0, 1);
                    discounted += u.SsdBytes + u.HddBytes;
                }
            }
            i = j;
        }
        if (runs > 0)
        {
            notes.Add($"{RebalancePlan.Size(discounted)} in {runs} sequential run(s) of at least {RebalancePlan.Size(runBytes)} ranked by their random I/O only: HDD bandwidth serves the scans");
        }
    }

    private static (bool Skewed, double Top20) Skew(ReadOnlySpan<Unit> units, int[] hottestFirst, double minimum)
    {
        double total = 0, bytes = 0;
        foreach (ref readonly var u in units)
        {
            total += u.Score;
            bytes += (double)u.SsdBytes + u.HddBytes;
        }
        if (total <= 0)
        {
            return (false, 0);
        }
        double acc = 0, share = 0;
        foreach (var i in hottestFirst)
        {
            ref readonly var u = ref units[i];
            var b = u.SsdBytes + u.HddBytes;
            var take = Math.Min(b, bytes * 0.2 - acc);
            if (take <= 0)
            {
                break;
            }
            share += u.Score * take / b;
            acc += take;
        }
        var top = share / total;
        return (top >= minimum, top);
    }

    private static PlacementPrediction Predict(ReadOnlySpan<Unit> units, RebalancePolicy policy, byte[]? target)
    {
        double reads = 0, writes = 0, ssdReads = 0, ssdWrites = 0;
        long ssdBytes = 0;
        for (var i = 0; i < units.Length; i++)
        {
            ref readonly var u = ref units[i];
            double total = u.SsdBytes + u.HddBytes;
            var ssd = (target?[i] ?? Stay) switch
            {
                ToSsd => u.SsdBytes + u.HddBytes,
                ToHdd => 0,
                _ => u.SsdBytes,
            };
            var frac = total == 0 ? 0 : ssd / total;
            reads += u.Reads;
            writes += u.Writes;
            ssdReads += u.Reads * frac;
            ssdWrites += u.Writes * frac;
            ssdBytes += ssd;
        }
        var rs = reads == 0 ? 0 : ssdReads / reads;
        var ws = writes == 0 ? 0 : ssdWrites / writes;
        var latency = TimeSpan.FromTicks((long)(rs * policy.Ssd.Latency.Ticks + (1 - rs) * policy.Hdd.Latency.Ticks));
        return new PlacementPrediction(rs, ws, ssdBytes, latency);
    }

    /// <summary>
    /// The marked moves as ranges: demotions first (they make room), then promotions, each in image and
    /// disk order (the order units were collected in), neighbours going the same way merged.
    /// </summary>
    private static List<PlannedMove> Coalesce(IReadOnlyList<RebalanceInput> inputs, ReadOnlySpan<Unit> units, byte[] target, int[] rank, RebalancePolicy policy)
    {
        var result = new List<PlannedMove>();
        var gap = (policy.Hdd.Latency - policy.Ssd.Latency).TotalSeconds;
        var copyRate = Math.Min(policy.Ssd.BytesPerSecond, policy.Hdd.BytesPerSecond);
        foreach (var dir in (ReadOnlySpan<byte>)[ToHdd, ToSsd])
        {
            var to = dir == ToSsd ? StorageTier.Ssd : StorageTier.Hdd;
            var open = false;
            int image = 0, bestUnit = 0;
            long start = 0, end = 0, bytes = 0, lastIndex = -2;
            float best = 0;
            double ops = 0;
            for (var ui = 0; ui < units.Length; ui++)
            {
                if (target[ui] != dir)
                {
                    continue;
                }
                ref readonly var unit = ref units[ui];
                var heat = inputs[unit.Image].Heat;
                var unitStart = unit.Index << heat.UnitBits;
                var unitEnd = Math.Min(unitStart + heat.UnitSize, inputs[unit.Image].Image.Size);
                var b = dir == ToSsd ? unit.HddBytes : unit.SsdBytes;
                if (open && unit.Image == image && unit.Index == lastIndex + 1)
                {
                    end = unitEnd;
                    bytes += b;
                    ops += unit.Score;
                    if (dir == ToSsd ? unit.Score > best : unit.Score < best)
                    {
                        best = unit.Score;
                        bestUnit = ui;
                    }
                }
                else
                {
                    if (open)
                    {
                        result.Add(Move(image, start, end, bytes, to, best, rank[bestUnit], ops));
                    }
                    open = true;
                    (image, start, end, bytes, best, bestUnit, ops) = (unit.Image, unitStart, unitEnd, b, unit.Score, ui, unit.Score);
                }
                lastIndex = unit.Index;
            }
            if (open)
            {
                result.Add(Move(image, start, end, bytes, to, best, rank[bestUnit], ops));
            }
        }
        return result;

        PlannedMove Move(int image, long start, long end, long bytes, StorageTier to, double best, long rank, double ops)
        {
            var cost = TimeSpan.FromSeconds(bytes / copyRate + (to == StorageTier.Ssd ? policy.Hdd.Latency : policy.Ssd.Latency).TotalSeconds);
            var benefit = TimeSpan.FromSeconds((to == StorageTier.Ssd ? 1 : -1) * ops * gap);
            var reason = to == StorageTier.Ssd
                ? $"hot: score {best:G4}, rank {rank}; copy {Ms(cost)}, saves {Ms(benefit)} of I/O time per heat window"
                : $"cold: score {best:G4}, rank {rank}; copy {Ms(cost)}, costs {Ms(-benefit)} of I/O time per heat window; makes room or enforces the budget";
            return new PlannedMove(image, start, end - start, bytes, to, best, rank, reason) { Cost = cost, Benefit = benefit };
        }

        static string Ms(TimeSpan t) => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{t.TotalMilliseconds:0.###} ms");
    }

    /// <summary>
    /// Applies a plan: demotions first (they make room), then promotions, each through the crash-safe
    /// tier move. Cancelling stops between batches with a consistent image; planning again resumes.
    /// </summary>
    /// <param name="plan">A plan made for these images.</param>
    /// <param name="images">The images, in the order given to <see cref="Plan"/>, open read-write.</param>
    /// <param name="progress">Progress after each batch.</param>
    /// <param name="cancellationToken">Stops between batches.</param>
    /// <returns>What was done.</returns>
    public static RebalanceResult Apply(RebalancePlan plan, IReadOnlyList<QcowImage> images, IProgress<RebalanceProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(images);
        if (images.Count != plan.ImageIds.Count)
        {
            throw new ArgumentException($"the plan is for {plan.ImageIds.Count} image(s), {images.Count} given", nameof(images));
        }
        for (var i = 0; i < images.Count; i++)
        {
            var info = images[i].GetInfo();
            if (images[i].IsReadOnly)
            {
                throw new InvalidOperationException($"{images[i].FileName}: open the image read-write to apply a plan");
            }
            if (info.Corrupt)
            {
                throw new QcowException($"{images[i].FileName}: the image is marked corrupt; repair it before rebalancing");
            }
            if (images[i].HeatIdentity != plan.ImageIds[i])
            {
                throw new ArgumentException($"{images[i].FileName}: the plan was made for image {plan.ImageIds[i]}, not {images[i].HeatIdentity}", nameof(images));
            }
        }
        var sw = Stopwatch.StartNew();
        var total = plan.Moves.Sum(m => m.Bytes);
        long done = 0;
        var applied = 0;
        // One batched move per image and direction, demotions first (they make room): a scattered plan
        // then shares each copy-flush-flip-flush cycle across up to 1024 clusters.
        var groups = plan.Moves.GroupBy(m => (m.To, m.Image)).OrderBy(g => g.Key.To == StorageTier.Ssd).ThenBy(g => g.Key.Image);
        foreach (var group in groups)
        {
            if (cancellationToken.IsCancellationRequested)
            {
                return new RebalanceResult(applied, done, sw.Elapsed, true);
            }
            var baseDone = done;
            var moves = group.ToList();
            var inner = new InlineProgress<long>(b =>
            {
                progress?.Report(new RebalanceProgress(applied, plan.Moves.Count, baseDone + b, total));
                if (plan.ThrottleBytesPerSecond is { } rate && rate > 0)
                {
                    // Throttle between batches: wait until the average rate is back under the cap.
                    var ahead = (baseDone + b) / rate - sw.Elapsed.TotalSeconds;
                    if (ahead > 0)
                    {
                        cancellationToken.WaitHandle.WaitOne(TimeSpan.FromSeconds(Math.Min(ahead, 3600)));
                    }
                }
            });
            try
            {
                var (_, bytes) = images[group.Key.Image].Core.MoveRangesToTier(
                    moves.Select(m => (m.Start, m.Length)).ToList(), (int)group.Key.To, inner, cancellationToken);
                done += bytes;
            }
            catch (OperationCanceledException)
            {
                return new RebalanceResult(applied, done, sw.Elapsed, true);
            }
            applied += moves.Count;
            progress?.Report(new RebalanceProgress(applied, plan.Moves.Count, done, total));
        }
        return new RebalanceResult(applied, done, sw.Elapsed, false);
    }

    private sealed class InlineProgress<T>(Action<T> report) : IProgress<T>
    {
        public void Report(T value) => report(value);
    }
}
