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
        public int Image;
        public long Index;     // unit index in the image's heat map
        public float Score;
        public float Reads;
        public float Writes;
        public int SsdBytes;   // allocated bytes of the unit on each tier
        public int HddBytes;
        public bool Pinned;
    }

    /// <summary>Plans moves for one or more images.</summary>
    /// <param name="inputs">The images and their heat maps.</param>
    /// <param name="policy">Budget, hysteresis, caps and weights.</param>
    /// <returns>The plan.</returns>
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

        var pools = policy.SharedBudget
            ? [(Members: Enumerable.Range(0, inputs.Count).ToArray(), Budget: policy.SsdBudgetBytes ?? budgets.Sum())]
            : Enumerable.Range(0, inputs.Count).Select(i => (Members: new[] { i }, Budget: budgets[i])).ToArray();

        var before = Predict(units, policy, null);
        var (skewed, top20) = Skew(units, policy.MinimumSkew);
        if (!skewed)
        {
            notes.Add($"the hottest 20% of the allocated data serves {top20:P0} of the I/O (threshold {policy.MinimumSkew:P0}): the workload has no skew worth tiering for; only budget overruns are corrected");
        }
        if (policy.SequentialRunBytes is not null)
        {
            notes.Add("sequential-run detection needs per-I/O traces; heat maps keep counts only, so every unit is ranked by its score");
        }

        var moves = new List<(int Unit, StorageTier To)>();
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
            var residentList = new List<int>();
            var contenderList = new List<int>();
            for (var u = 0; u < units.Count; u++)
            {
                var unit = units[u];
                if (!inPool[unit.Image])
                {
                    continue;
                }
                used += unit.SsdBytes;
                if (unit.Pinned)
                {
                    continue;
                }
                if (unit.SsdBytes > 0)
                {
                    residentList.Add(u);
                }
                if (unit.HddBytes > 0 && unit.Score >= policy.MinimumPromotionScore)
                {
                    contenderList.Add(u);
                }
            }
            // Coldest residents first, hottest contenders first; ties by disk order (units are in disk order).
            var residents = SortByScore(units, residentList, descending: false);
            var contenders = SortByScore(units, contenderList, descending: true);
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
            while (used > budget && r < residents.Count)
            {
                var d = residents[r++];
                if (!Fits(units[d].SsdBytes))
                {
                    break;
                }
                moves.Add((d, StorageTier.Hdd));
                moveBytes += units[d].SsdBytes;
                used -= units[d].SsdBytes;
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
                var need = (long)units[c].HddBytes;
                if (used + need <= budget)
                {
                    if (!Fits(need))
                    {
                        break;
                    }
                    moves.Add((c, StorageTier.Ssd));
                    moveBytes += need;
                    used += need;
                    continue;
                }
                // Make room by displacing residents that are clearly colder than the contender.
                var take = new List<int>();
                long freed = 0;
                var rr = r;
                while (used + need - freed > budget && rr < residents.Count)
                {
                    var d = residents[rr];
                    if (units[d].Score * policy.Hysteresis + policy.MinimumScoreGap >= units[c].Score)
                    {
                        break;
                    }
                    take.Add(d);
                    freed += units[d].SsdBytes;
                    rr++;
                }
                if (used + need - freed > budget || !Fits(need + freed))
                {
                    break; // every later contender is colder still
                }
                foreach (var d in take)
                {
                    moves.Add((d, StorageTier.Hdd));
                }
                r = rr;
                moves.Add((c, StorageTier.Ssd));
                moveBytes += need + freed;
                used += need - freed;
            }
        }
        if (capHit)
        {
            notes.Add($"the move cap of {RebalancePlan.Size(policy.MaxMoveBytes!.Value)} stopped the plan early; run again to continue");
        }
        var pinnedBytes = units.Where(u => u.Pinned).Sum(u => (long)u.SsdBytes + u.HddBytes);
        if (pinnedBytes > 0)
        {
            notes.Add($"{RebalancePlan.Size(pinnedBytes)} of pinned data stays where its pins say");
        }

        var target = new Dictionary<int, StorageTier>(moves.Count);
        foreach (var (unit, to) in moves)
        {
            target[unit] = to;
        }
        var after = Predict(units, policy, target);
        // Rank = position in the global heat order (1 = hottest), from one array sort.
        var order = new int[units.Count];
        var keys = new float[units.Count];
        for (var i = 0; i < order.Length; i++)
        {
            order[i] = i;
            keys[i] = -units[i].Score;
        }
        Array.Sort(keys, order);
        var rank = new long[units.Count];
        for (var i = 0; i < order.Length; i++)
        {
            rank[order[i]] = i + 1;
        }
        var planned = Coalesce(inputs, units, moves, rank);
        var totalBytes = planned.Sum(m => m.Bytes);
        var seconds = planned.Sum(m => m.Bytes / Math.Min(policy.Ssd.BytesPerSecond, policy.Hdd.BytesPerSecond)
            + (m.To == StorageTier.Ssd ? policy.Hdd.Latency : policy.Ssd.Latency).TotalSeconds);
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

    private static List<int> SortByScore(List<Unit> units, List<int> indices, bool descending)
    {
        var keys = new float[indices.Count];
        var items = indices.ToArray();
        for (var i = 0; i < items.Length; i++)
        {
            keys[i] = descending ? -units[items[i]].Score : units[items[i]].Score;
        }
        // Array.Sort is not stable: sort by (score, position) so equal scores keep disk order.
        var order = new long[items.Length];
        for (var i = 0; i < order.Length; i++)
        {
            order[i] = i;
        }
        Array.Sort(order, (a, b) => keys[a] != keys[b] ? keys[a].CompareTo(keys[b]) : a.CompareTo(b));
        var result = new List<int>(items.Length);
        foreach (var o in order)
        {
            result.Add(items[o]);
        }
        return result;
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
    /// always the last one added, and pins are walked with a pointer, not searched per unit.
    /// </summary>
    private static void CollectUnits(int image, QcowImage img, HeatMap heat, RebalancePolicy policy, List<Unit> units)
    {
        var unitBits = heat.UnitBits;
        var unitSize = heat.UnitSize;
        var pins = img.GetTierPins();
        var pin = 0;
        var last = -1L;
        foreach (var ext in img.GetPlacement())
        {
            if (ext.Tier is not { } tier)
            {
                continue;
            }
            for (var pos = ext.Start; pos < ext.Start + ext.Length;)
            {
                var u = pos >> unitBits;
                var n = (int)(Math.Min((u + 1) << unitBits, ext.Start + ext.Length) - pos);
                if (u != last)
                {
                    last = u;
                    var h = u < heat.UnitCount ? heat.GetUnit(u) : default;
                    var start = u << unitBits;
                    while (pin < pins.Count && pins[pin].Start + pins[pin].Length <= start)
                    {
                        pin++;
                    }
                    units.Add(new Unit
                    {
                        Image = image,
                        Index = u,
                        Reads = h.Reads,
                        Writes = h.Writes,
                        Score = (float)(policy.ReadWeight * h.Reads + policy.WriteWeight * h.Writes),
                        Pinned = pin < pins.Count && pins[pin].Start < start + unitSize,
                    });
                }
                ref var unit = ref System.Runtime.InteropServices.CollectionsMarshal.AsSpan(units)[^1];
                if (tier == StorageTier.Ssd)
                {
                    unit.SsdBytes += n;
                }
                else
                {
                    unit.HddBytes += n;
                }
                pos += n;
            }
        }
    }

    private static (bool Skewed, double Top20) Skew(List<Unit> units, double minimum)
    {
        var total = units.Sum(u => (double)u.Score);
        if (total <= 0)
        {
            return (false, 0);
        }
        var bytes = units.Sum(u => (double)u.SsdBytes + u.HddBytes);
        double acc = 0, share = 0;
        foreach (var u in units.OrderByDescending(u => u.Score))
        {
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

    private static PlacementPrediction Predict(List<Unit> units, RebalancePolicy policy, Dictionary<int, StorageTier>? moves)
    {
        double reads = 0, writes = 0, ssdReads = 0, ssdWrites = 0;
        long ssdBytes = 0;
        for (var i = 0; i < units.Count; i++)
        {
            var u = units[i];
            double total = u.SsdBytes + u.HddBytes;
            var ssd = u.SsdBytes;
            if (moves is not null && moves.TryGetValue(i, out var to))
            {
                ssd = to == StorageTier.Ssd ? u.SsdBytes + u.HddBytes : 0;
            }
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

    /// <summary>Merges moves of neighbouring units of one image going the same way into one range.</summary>
    private static List<PlannedMove> Coalesce(IReadOnlyList<RebalanceInput> inputs, List<Unit> units, List<(int Unit, StorageTier To)> moves, long[] rank)
    {
        // Demotions first (they make room), then by image and offset: one array sort on a packed key.
        var keys = new long[moves.Count];
        var order = new int[moves.Count];
        for (var i = 0; i < moves.Count; i++)
        {
            var u = units[moves[i].Unit];
            keys[i] = ((moves[i].To == StorageTier.Ssd ? 1L : 0L) << 62) | ((long)u.Image << 46) | u.Index;
            order[i] = i;
        }
        Array.Sort(keys, order);
        var result = new List<PlannedMove>();
        var open = false;
        int image = 0, bestUnit = 0;
        StorageTier to = default;
        long start = 0, end = 0, bytes = 0, lastIndex = -2;
        double best = 0;
        void Close()
        {
            if (open)
            {
                var reason = to == StorageTier.Ssd
                    ? $"hot: score {best:G4}, rank {rank[bestUnit]}"
                    : $"cold: score {best:G4}, rank {rank[bestUnit]}; makes room or enforces the budget";
                result.Add(new PlannedMove(image, start, end - start, bytes, to, best, rank[bestUnit], reason));
            }
        }
        foreach (var i in order)
        {
            var (ui, dir) = moves[i];
            var unit = units[ui];
            var heat = inputs[unit.Image].Heat;
            var unitStart = unit.Index << heat.UnitBits;
            var unitEnd = Math.Min(unitStart + heat.UnitSize, inputs[unit.Image].Image.Size);
            var b = dir == StorageTier.Ssd ? unit.HddBytes : unit.SsdBytes;
            if (open && dir == to && unit.Image == image && unit.Index == lastIndex + 1)
            {
                end = unitEnd;
                bytes += b;
                if (dir == StorageTier.Ssd ? unit.Score > best : unit.Score < best)
                {
                    best = unit.Score;
                    bestUnit = ui;
                }
            }
            else
            {
                Close();
                open = true;
                (image, to, start, end, bytes, best, bestUnit) = (unit.Image, dir, unitStart, unitEnd, b, unit.Score, ui);
            }
            lastIndex = unit.Index;
        }
        Close();
        return result;
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
